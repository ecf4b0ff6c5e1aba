"""Markdown table and bar chart of a `sdtrt bench` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtrt.fsutil import atomic_path

COMPONENTS = (("text_encoder", "text encoder"), ("vae_encoder", "VAE encode"),
              ("controlnet", "ControlNets (all steps)"), ("unet", "U-Net (all steps)"),
              ("sampler_update", "sampler update (all steps)"), ("vae_decoder", "VAE decode"))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    device = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_count')} cores)"
    lines = [f"Device: {device}; precision {result['precision']}; model {result['model']['family']}; "
             f"{result['config'].get('task', 'txt2img')}"
             + (f" with {result['config']['controlnets']} ControlNet(s)" if result["config"].get("controlnets") else "")
             + (f" (strength {result['config']['strength']:g})" if result["config"].get("strength") else "")
             + f", {result['config']['steps']} steps, batch {result['config']['batch']}, runs "
             f"{result['config']['runs']} (warm-up {result['config']['warmup']})", ""]
    if result["config"].get("also_backends"):  # more than sdtrt and the baseline: a column per system
        return "\n".join(lines + systems_markdown(result))
    for entry in result["results"]:
        systems = entry["systems"]
        ours, base = systems["sdtrt"], systems.get("baseline")
        lines += [f"### {entry['size']}, batch {entry['batch']}", "",
                  f"sdtrt: {ours['backend']}" + (f"; baseline: {base['backend']}" if base else ""), "",
                  "| metric | sdtrt | baseline | sdtrt / baseline |", "|---|---|---|---|"]

        def row(label, a, b, fmt="{:.3f}"):
            lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b) if b is not None else '-'} | "
                         f"{_ratio(a, b) if b is not None else '-'} |")

        get = lambda s, *path: None if s is None else _dig(s, path)  # noqa: E731
        row("latency per image, median (s)", ours["latency_per_image_s"], get(base, "latency_per_image_s"))
        row("latency, p90 (s)", ours["latency_s"]["p90"], get(base, "latency_s", "p90"))
        row("latency, min (s)", ours["latency_s"]["min"], get(base, "latency_s", "min"))
        row("images/s", ours["images_per_s"], get(base, "images_per_s"))
        row("U-Net it/s", ours["unet_it_per_s"], get(base, "unet_it_per_s"), "{:.2f}")
        for key, label in (("text_encoder", "text encoder (ms)"), ("vae_encoder", "VAE encode (ms)"),
                           ("controlnet_per_step", "ControlNets per step (ms)"), ("unet_per_step", "U-Net per step (ms)"),
                           ("sampler_update_per_step", "sampler update per step (ms)"), ("vae_decoder", "VAE decode (ms)")):
            if key not in ours["components_s"]:
                continue
            b = get(base, "components_s", key)
            row(label, ours["components_s"][key] * 1e3, None if b is None else b * 1e3, "{:.2f}")
        if "unet_tflop_per_step" in entry:  # the roofline figure (results of an older sdtrt have none)
            lines += _roofline_rows(entry, ours, base)
        if "psnr_db_vs_baseline" in entry:
            lines.append(f"| PSNR vs baseline (dB) | {entry['psnr_db_vs_baseline']:.1f} | | |")
        if entry.get("unet_flops_note"):
            lines += ["", f"U-Net achieved TFLOP/s n/a: {entry['unet_flops_note']}."]
        lines.append("")
    cold, mem = result["cold_start_s"], result["memory"]
    lines += ["| process | sdtrt | baseline | ratio |", "|---|---|---|---|"]
    b_cold = cold.get("baseline")
    lines.append(f"| cold start: load to first image (s) | {cold['sdtrt']:.2f} | "
                 f"{'-' if b_cold is None else f'{b_cold:.2f}'} | {_ratio(cold['sdtrt'], b_cold) if b_cold else '-'} |")
    if result.get("lora_s"):
        a, b = result["lora_s"].get("sdtrt"), result["lora_s"].get("baseline")
        lines.append(f"| LoRAs: read and apply (s) | {a:.2f} | {'-' if b is None else f'{b:.2f}'} | "
                     f"{_ratio(a, b) if b else '-'} |")
    for key in sorted({k for m in mem.values() for k in m}):
        a, b = mem["sdtrt"].get(key), mem.get("baseline", {}).get(key)
        lines.append(f"| {key.replace('_', ' ')} | {'-' if a is None else f'{a:.0f}'} | {'-' if b is None else f'{b:.0f}'} | "
                     f"{_ratio(a, b) if a is not None and b else '-'} |")
    ho = result["host_overhead"]
    lines += ["", f"Runtime host overhead with null engines ({ho['sampler']}, {ho['size']}x{ho['size']}, {ho['steps']} steps): "
              f"{ho['us_per_step']:.0f} µs per step, of which sampler update {ho['sampler_update_us_per_step']:.0f} µs."]
    return "\n".join(lines)


def _roofline_rows(entry: dict[str, Any], ours: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """The U-Net's FLOPs per step (the same for both systems) and what each achieved: FLOPs / U-Net time per step."""
    if entry["unet_tflop_per_step"] is None:
        return ["| U-Net FLOPs per step (TFLOP) | n/a | | |",
                f"| U-Net achieved TFLOP/s | n/a | {'n/a' if base else '-'} | - |"]
    a, b = ours["unet_tflops_achieved"], base["unet_tflops_achieved"] if base else None
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    return [f"| U-Net FLOPs per step (TFLOP) | {entry['unet_tflop_per_step']:.4g} | | |",
            f"| U-Net achieved TFLOP/s | {fmt(a)} | {fmt(b) if base else '-'} | {_ratio(a, b) if a and b else '-'} |"]


_METRICS = (("latency per image, median (s)", ("latency_per_image_s",), 1, "{:.3f}"),
            ("latency, p90 (s)", ("latency_s", "p90"), 1, "{:.3f}"), ("latency, min (s)", ("latency_s", "min"), 1, "{:.3f}"),
            ("images/s", ("images_per_s",), 1, "{:.3f}"), ("U-Net it/s", ("unet_it_per_s",), 1, "{:.2f}"),
            ("text encoder (ms)", ("components_s", "text_encoder"), 1e3, "{:.2f}"),
            ("VAE encode (ms)", ("components_s", "vae_encoder"), 1e3, "{:.2f}"),
            ("ControlNets per step (ms)", ("components_s", "controlnet_per_step"), 1e3, "{:.2f}"),
            ("U-Net per step (ms)", ("components_s", "unet_per_step"), 1e3, "{:.2f}"),
            ("sampler update per step (ms)", ("components_s", "sampler_update_per_step"), 1e3, "{:.2f}"),
            ("VAE decode (ms)", ("components_s", "vae_decoder"), 1e3, "{:.2f}"),
            ("U-Net achieved TFLOP/s", ("unet_tflops_achieved",), 1, "{:.4g}"))


def systems_markdown(result: dict[str, Any]) -> list[str]:
    """The tables of a run with more systems than sdtrt and the baseline (``--also-backend``): a column per system,
    its latency as a multiple of sdtrt's, its PSNR against the baseline and against sdtrt's image."""
    lines: list[str] = []
    names: list[str] = []
    for entry in result["results"]:
        systems = entry["systems"]
        names = list(systems)
        lines += [f"### {entry['size']}, batch {entry['batch']}", "",
                  "; ".join(f"{k}: {s['backend']}" for k, s in systems.items()), "",
                  "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for label, path, scale, fmt in _METRICS:
            values = [_get(s, path) for s in systems.values()]
            if values[0] is not None:
                lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v * scale) for v in values)
                             + " |")
        flops = entry.get("unet_tflop_per_step")
        lines.append("| U-Net FLOPs per step (TFLOP) | " + " | ".join(
            [f"{flops:.4g}" if flops else f"n/a ({entry.get('unet_flops_note', '')})"] + [""] * (len(names) - 1)) + " |")
        ours = systems["sdtrt"]["latency_per_image_s"]
        lines.append("| latency / sdtrt's | " + " | ".join(_ratio(s["latency_per_image_s"], ours)
                                                          for s in systems.values()) + " |")
        for key, label in (("psnr_db", "PSNR vs baseline (dB)"), ("psnr_db_vs_sdtrt", "PSNR vs sdtrt (dB)")):
            if key in entry:
                lines.append(f"| {label} | " + " | ".join(f"{entry[key][k]:.1f}" if k in entry[key] else ""
                                                          for k in names) + " |")
        lines.append("")
    cold, mem, load = result["cold_start_s"], result["memory"], result.get("load_s", {})
    lines += ["| process | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
              "| load (s) | " + " | ".join(_fmt(load.get(k), "{:.2f}") for k in names) + " |",
              "| cold start: load to first image (s) | " + " | ".join(_fmt(cold.get(k), "{:.2f}") for k in names) + " |"]
    if result.get("lora_s"):
        lines.append("| LoRAs: read and apply (s) | " + " | ".join(_fmt(result["lora_s"].get(k), "{:.2f}")
                                                                  for k in names) + " |")
    for key in sorted({k for m in mem.values() for k in m}):
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(_fmt(mem.get(k, {}).get(key), "{:.0f}")
                                                                 for k in names) + " |")
    for k, d in result.get("backend_details", {}).items():  # OpenVINO's: the precision that ran
        if "openvino" not in d:
            continue
        lines += ["", f"{k}: OpenVINO {d.get('openvino', '?').split('-')[0]} on {d.get('device')} "
                      f"({', '.join(d.get('optimization_capabilities', []))}), precision {d.get('inference_precision')}"
                      f" (asked: {d.get('requested_precision')}), {d.get('threads')} threads"]
    ho = result["host_overhead"]
    lines += ["", f"Runtime host overhead with null engines ({ho['sampler']}, {ho['size']}x{ho['size']}, {ho['steps']} "
              f"steps): {ho['us_per_step']:.0f} µs per step, of which sampler update {ho['sampler_update_us_per_step']:.0f} µs."]
    return lines


def _get(obj, path):
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _dig(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def plot(result: dict[str, Any], path: Path) -> None:
    """Stacked bars of the per-component time of one image, per size and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, stacks = [], []
    for entry in result["results"]:
        for name, s in entry["systems"].items():
            c = s["components_s"]
            labels.append(f"{name}\n{entry['size']}")
            stacks.append([c["text_encoder"], c.get("vae_encoder", 0.0), c.get("controlnet_per_step", 0.0) * s["steps"],
                           c["unet_per_step"] * s["steps"],
                           c["sampler_update_per_step"] * s["steps"], c["vae_decoder"]])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 4.5))
    bottoms = [0.0] * len(labels)
    for i, (_, label) in enumerate(COMPONENTS):
        values = [s[i] for s in stacks]
        ax.bar(labels, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("seconds per generation (median)")
    env = result["environment"]
    ax.set_title(f"{result['model']['family']} {result['precision']}, {result['config']['steps']} steps — "
                 f"{env.get('gpu') or env.get('cpu')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(Path(path), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
