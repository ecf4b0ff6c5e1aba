"""Replaying an image (``--from-png``) with the LoRAs and embeddings it was made with, found and checked.

An image's text names them as A1111 does (``infotext.py``): ``Lora hashes`` ("name: short hash" of every LoRA:
fused into the model at export, applied with ``--lora``, named by a ``<lora:name:weight>`` prompt tag, in that
order), sdtrt's ``Lora weights`` (the weights of the ``--lora`` ones) and ``TI hashes`` (the embeddings the prompts
use). The files are not in the image: they are found among the ``--lora`` files given (by hash, else by name), then
in ``--lora-dir`` (``name.safetensors``), and each must be the file the image was made with (``lora.lora_matches``).
One that is missing, or a different file under the same name, is refused, naming it: a replay never silently makes
a different image. A fused LoRA is fine when this folder fused the same file.

A1111 finds a LoRA named in a prompt tag by its hash among its LoRA folder's files, else by name; it does the same
with a missing one as with any unknown tag (ignores it, with an optional warning). sdtrt refuses instead: the reason
to replay is to get the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtrt.errors import UsageError
from sdtrt.runtime.infotext import Replay
from sdtrt.runtime.lora import collect_tags, file_digest, lora_matches, network_name, parse_spec


_MADE_WITH = "the image was made with "


@dataclass
class _Recorded:
    """One LoRA of the image: its name in the text, weight (None: not recorded), short hash (None: not recorded)."""

    name: str
    weight: float | None
    hash: str | None
    kind: str  # "flag" (Lora weights), "tag" (a prompt tag), "fused" (a Lora hashes entry alone)
    applied: bool = True  # a tag of a prompt the flags replaced: matched to its hash, not applied
    file: str | None = None

    def describe(self) -> str:
        extra = ", ".join(x for x in (f"hash {self.hash}" if self.hash else "",
                                      f"weight {self.weight:g}" if self.weight is not None else "") if x)
        return f"{self.name}" + (f" ({extra})" if extra else "")


@dataclass
class _Given:
    path: str
    weight: float
    weighted: bool  # FILE:WEIGHT, not FILE
    used: bool = False
    stem: str = field(init=False)

    def __post_init__(self):
        self.stem = network_name(Path(self.path).stem)


@dataclass(frozen=True)
class ReplayLoras:
    """What the pipeline needs to apply an image's LoRAs as its generation did."""

    loras: tuple[tuple[str, float], ...]  # for Pipeline.set_loras, in the generation's order
    files: dict[str, str]  # prompt-tag name -> its checked file (Pipeline.lora_files)


def resolve_loras(r: Replay, given=(), lora_dir=None, fused=(), prompt_kept: bool = True,
                  negative_kept: bool = True) -> ReplayLoras:
    """The LoRAs of the replayed image ``r``: ``given``, the ``--lora FILE[:WEIGHT]`` specs of the replay (a file the
    image names gets its recorded weight unless one is given; others are added); ``lora_dir``, the ``--lora-dir``;
    ``fused``, the folder's fused LoRAs (``manifest.model.loras``: "name:scale:hash"); ``prompt_kept`` /
    ``negative_kept``: whether the replay keeps the image's prompt / negative prompt (flags may replace them, and
    their tags with them). Raises a ``UsageError`` naming every LoRA that is missing or not the same file."""
    recorded = _recorded(r, prompt_kept, negative_kept)
    specs = [_spec(text) for text in given]
    fused_here = {(network_name(n), h.lower()) for n, _, h in (x.rsplit(":", 2) for x in fused)}
    problems: list[str] = []
    for item in recorded:
        if item.kind == "fused" and any(n == item.name and _same(h, item.hash) for n, h in fused_here):
            item.applied = False  # in this folder's weights already
            continue
        if item.applied:
            problems += _find(item, specs, lora_dir)
    if problems:
        raise UsageError(_MADE_WITH + "; ".join(problems))
    loras = [(i.file, i.weight) for kind in ("fused", "flag") for i in recorded if i.kind == kind and i.applied]
    loras += [(s.path, s.weight) for s in specs if not s.used]  # the replay's own additions, last
    files = {i.name: i.file for i in recorded if i.kind == "tag" and i.applied}
    return ReplayLoras(tuple(loras), files)


def _same(a: str, b: str) -> bool:
    """Two short hashes of one file (written to different lengths)."""
    n = min(len(a), len(b))
    return n >= 8 and a[:n] == b[:n]


def _spec(text: str) -> _Given:
    path, weight = parse_spec(text)
    return _Given(path, weight, weighted=path != text)


def _recorded(r: Replay, prompt_kept: bool, negative_kept: bool) -> list[_Recorded]:
    """The image's LoRAs in the order its generation applied them, each with the "Lora hashes" entry that is its:
    the entries are fused, then --lora (Lora weights), then tagged LoRAs, so they are matched from the end."""
    _, tags = collect_tags([r.prompt, r.negative_prompt])
    kept_tags = collect_tags([r.prompt] * prompt_kept + [r.negative_prompt] * negative_kept)[1]
    items = [_Recorded(name, weight, None, "flag") for name, weight in r.lora_weights]
    items += [_Recorded(name, weight, None, "tag", applied=name in kept_tags) for name, weight in tags.items()]
    hashes = list(r.lora_hashes)
    for item in reversed(items):
        for j in range(len(hashes) - 1, -1, -1):
            if hashes[j][0] == network_name(item.name):
                item.hash = hashes.pop(j)[1]
                break
    # entries of no tag and no weight: fused at export, or an sdtrt image from before "Lora weights"
    return [_Recorded(name, None, h, "fused") for name, h in hashes] + items


def _find(item: _Recorded, specs: list[_Given], lora_dir) -> list[str]:
    """Set ``item.file`` (and its weight from a flag), or say what is wrong."""
    # a file serves one flag entry, and any prompt tag too (one LoRA given with --lora and tagged in the prompt)
    usable = [s for s in specs if (not s.used or item.kind == "tag") and Path(s.path).expanduser().is_file()]
    by_hash = [s for s in usable if item.hash and lora_matches(s.path, item.hash)]
    by_name = [s for s in usable if s.stem == network_name(item.name)]
    if by_hash or (by_name and not item.hash):
        spec = (by_hash or by_name)[0]
        spec.used = True
        if item.kind != "tag" and spec.weighted:  # a tag's weight is in the prompt; edit it there
            item.weight = spec.weight
        if item.weight is None:
            return [f"LoRA {item.describe()} without a recorded weight (fused at export, or an sdtrt image from "
                    f"before weights were recorded): give it, --lora {spec.path}:WEIGHT"]
        item.file = spec.path
        return []
    if by_name:
        return [_mismatch(item, by_name[0].path)]
    if lora_dir is not None and item.kind != "fused":
        path = Path(lora_dir).expanduser() / f"{item.name}.safetensors"
        if path.is_file():
            if item.hash and not lora_matches(path, item.hash):
                return [_mismatch(item, path)]
            item.file = str(path)
            return []
    where = {"flag": "applied with --lora", "tag": "named by its prompt tag", "fused": "fused into its model at export "
             "or applied with --lora"}[item.kind]
    how = {"tag": f"--lora-dir DIR holding {item.name}.safetensors, or --lora FILE",
           "flag": f"--lora FILE, or --lora-dir DIR holding {item.name}.safetensors",
           "fused": "--lora FILE:WEIGHT, or replay on a folder that fused it"}[item.kind]
    return [f"LoRA {item.describe()}, {where}, which is not given: pass {how}"]


def _mismatch(item: _Recorded, path) -> str:
    return (f"LoRA {item.name} of hash {item.hash}, but {path} is another file (A1111 hash "
            f"{file_digest(path, 'lora')[:12]}): pass the file the image was made with")


def check_embeddings(r: Replay, loaded: dict[str, Path], prompt_kept: bool = True, negative_kept: bool = True) -> None:
    """Refuse, naming them, the embeddings the image's prompts used ("TI hashes") that are not loaded (``loaded``:
    token -> file, ``Pipeline.embedding_files``) or are another file; those of a prompt the replay replaced are not
    needed."""
    problems = _embedding_problems(r, loaded, prompt_kept, negative_kept)
    if problems:
        raise UsageError(_MADE_WITH + "; ".join(problems))


def _embedding_problems(r: Replay, loaded: dict[str, Path], prompt_kept: bool, negative_kept: bool) -> list[str]:
    texts = " ".join([r.prompt] * prompt_kept + [r.negative_prompt] * negative_kept).lower()
    names = {network_name(t): t for t in loaded} | {network_name(t).lower(): t for t in loaded}
    problems = []
    for name, short in dict(r.ti_hashes).items():
        if name.lower() not in texts:
            continue
        token = names.get(name) or names.get(name.lower())
        if token is None:
            problems.append(f"embedding {name} (hash {short}), which is not loaded: pass --embedding FILE or "
                            "--embeddings-dir DIR")
        elif not file_digest(loaded[token]).startswith(short):
            problems.append(f"embedding {name} of hash {short}, but {loaded[token]} is another file (hash "
                            f"{file_digest(loaded[token])[:12]}): pass the file the image was made with")
    return problems


def apply(pipe, r: Replay, given=(), lora_dir=None, prompt_kept: bool = True, negative_kept: bool = True) -> None:
    """Set ``pipe`` up to replay ``r``: its LoRAs found, checked and applied, its embeddings checked; every missing or
    different file named in one error."""
    problems = _embedding_problems(r, pipe.embedding_files, prompt_kept, negative_kept)
    try:
        found = resolve_loras(r, given, lora_dir, pipe.manifest.model.loras, prompt_kept, negative_kept)
    except UsageError as ex:
        problems.insert(0, str(ex).removeprefix(_MADE_WITH))
    if problems:
        raise UsageError(_MADE_WITH + "; ".join(problems))
    pipe.lora_files = dict(found.files)
    pipe.set_loras(list(found.loras))
