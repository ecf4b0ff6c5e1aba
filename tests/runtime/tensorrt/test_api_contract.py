"""API-surface contract: every TensorRT name sdtrt uses, and every name and signature of the fake, exists in
the real bindings of TensorRT 10.x and 11.x.

The ``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings`` wheels hold the real ``tensorrt.so`` without
the libraries; it imports once stub ``libnvinfer.so.N``, ``libnvinfer_plugin.so.N`` and
``libnvonnxparser.so.N`` exist (compiled here, every symbol returning null, like CUDA's stub libcuda).
Nothing is called on it: classes, enums and signatures are only read. Skips where a C compiler or the
package registry is missing.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.runtime.tensorrt import fakes

WHEELS = {"10": "tensorrt-cu12-bindings==10.16.1.11", "11": "tensorrt-cu13-bindings==11.4.0.106"}
STUB_SYMBOLS = ("createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
                "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getNvOnnxParserVersion",
                "initLibNvInferPlugins", "getPluginRegistry", "getBuilderPluginRegistry")
SOURCES = sorted((Path(__file__).parents[3] / "runtime" / "tensorrt").glob("*.py"))

DUMP = r"""
import inspect, json, sys
import tensorrt_bindings as trt
classes = json.loads(sys.argv[1])
out = {"version": trt.__version__, "module": sorted(dir(trt)), "classes": {}}
for name in classes:
    cls = getattr(trt, name, None)
    if cls is None:
        continue
    members = {}
    for m in dir(cls):
        if m.startswith("__") and m != "__init__":
            continue
        attr = inspect.getattr_static(cls, m)
        if isinstance(attr, property):
            members[m] = {"kind": "property", "settable": attr.fset is not None}
        elif callable(attr) and hasattr(attr, "__doc__") and type(attr).__name__ in ("instancemethod", "builtin_function_or_method", "function", "wrapper_descriptor"):
            sigs = [l.strip() for l in (getattr(cls, m).__doc__ or "").splitlines()
                    if l.strip().split("(")[0].lstrip("0123456789. ") == m]
            members[m] = {"kind": "method", "signatures": sigs}
        else:
            members[m] = {"kind": "value"}
    out["classes"][name] = members
print(json.dumps(out))
"""


def _params(signature: str) -> list[str]:
    """Parameter names of a pybind11 signature line, without self."""
    inner = signature.split("(", 1)[1].rsplit(")", 1)[0]
    names, depth, current = [], 0, ""
    for ch in inner + ",":
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(current.split(":")[0].split("=")[0].strip())
            current = ""
        else:
            current += ch
    return [n for n in names if n and n != "self" and not n.startswith("*")]


@pytest.fixture(scope="session", params=sorted(WHEELS))
def real_api(request, tmp_path_factory):
    major = request.param
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub libnvinfer")
    root = tmp_path_factory.mktemp(f"trt{major}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                           WHEELS[major], "-d", str(root)], capture_output=True, text=True)
    wheels = list(root.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {WHEELS[major]} (no package registry?): {proc.stderr.strip()[-200:]}")
    site = root / "site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    stubs = root / "stubs"
    stubs.mkdir()
    source = stubs / "stub.c"
    source.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in STUB_SYMBOLS))
    for lib in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
        name = f"lib{lib}.so.{major}"
        subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(stubs / name), str(source)], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(stubs), PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", DUMP, json.dumps(fakes.FAKED_CLASSES + ("BuilderFlag",))], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    api = json.loads(out.stdout)
    assert api["version"].startswith(major + ".")
    return api


def project_chains() -> set[tuple[str, ...]]:
    """Every attribute chain rooted at the ``trt`` module in sdtrt's TensorRT code, e.g. ("Logger", "WARNING")."""
    chains = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None), ast.Attribute):
                parts, cur = [], node
                while isinstance(cur, ast.Attribute):
                    parts.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id == "trt":
                    chains.add(tuple(reversed(parts)))
    # keep only maximal chains (trt.Logger.WARNING, not also trt.Logger)
    return {c for c in chains if not any(o != c and o[:len(c)] == c for o in chains)}


def project_constructors() -> set[str]:
    """Classes sdtrt instantiates itself: ``trt.X(...)``."""
    made = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            f = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and f.value.id == "trt" and f.attr[:1].isupper():
                made.add(f.attr)
    return made


def missing_chains(api: dict, chains) -> list[str]:
    problems = []
    for chain in sorted(chains):
        if chain == ("__version__",):
            continue
        head, *rest = chain
        if head not in api["module"]:
            problems.append(f"trt.{head}")
        elif rest and (head not in api["classes"] or rest[0] not in api["classes"][head]):
            problems.append("trt." + ".".join(chain))
    return problems


def fake_mismatches(api: dict) -> list[str]:
    problems = []
    for name in fakes.FAKED_CLASSES:
        real = api["classes"].get(name)
        if real is None:
            problems.append(f"class {name}")
            continue
        fake_cls = getattr(fakes, name)
        for member, attr in vars(fake_cls).items():
            if member.startswith("_") and member != "__init__":
                continue
            if member in ("fail_on", "wrong", "built", "cudart", "made"):  # test controls, not API
                continue
            if member not in real:
                problems.append(f"{name}.{member}")
                continue
            kind = real[member]["kind"]
            if isinstance(attr, property):
                if kind != "property":
                    problems.append(f"{name}.{member} is a {kind} in TensorRT, a property in the fake")
            elif inspect.isfunction(attr):
                if kind != "method":
                    problems.append(f"{name}.{member} is a {kind} in TensorRT, a method in the fake")
                    continue
                mine = [p for p in inspect.signature(attr).parameters if p != "self"]
                overloads = [_params(s) for s in real[member]["signatures"]]
                if member == "__init__" and not overloads:
                    continue  # no public constructor: TensorRT makes these objects, and so does the fake

                if not any(o[:len(mine)] == mine for o in overloads):
                    problems.append(f"{name}.{member}({', '.join(mine)}) matches no overload: {overloads}")
    return problems


def test_every_tensorrt_name_sdtrt_uses_exists(real_api):
    chains = project_chains()
    assert ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in chains  # the scan sees the code
    assert missing_chains(real_api, chains) == []


# what sdtrt's TensorRT code calls its TensorRT objects (the receivers' names are kept to these on purpose)
RECEIVERS = {"refitter": "Refitter", "proto": "Weights", "cuda_engine": "ICudaEngine", "self.engine": "ICudaEngine",
             "e.engine": "ICudaEngine", "engine.engine": "ICudaEngine", "self.context": "IExecutionContext",
             "ctx": "IExecutionContext", "other": "IExecutionContext", "builder": "Builder", "parser": "OnnxParser",
             "config": "IBuilderConfig", "opt_profile": "IOptimizationProfile", "runtime": "Runtime"}


def project_methods() -> dict[str, set[str]]:
    """TensorRT class -> the members sdtrt's TensorRT code uses on objects of it (``refitter.get_missing_weights``)."""
    used: dict[str, set[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                receiver = ast.unparse(node.value)
                if receiver in RECEIVERS:
                    used.setdefault(RECEIVERS[receiver], set()).add(node.attr)
    return used


def test_every_tensorrt_member_sdtrt_uses_exists(real_api):
    used = project_methods()
    assert {"get_missing_weights", "get_weights_prototype", "get_all_weights", "set_named_weights",
            "refit_cuda_engine"} <= used["Refitter"]  # the scan sees the code
    assert {"get_tensor_dtype", "get_tensor_location", "get_tensor_format", "is_shape_inference_io",
            "get_tensor_shape", "create_execution_context"} <= used["ICudaEngine"]
    assert {"set_input_shape", "set_tensor_address", "execute_async_v3", "set_device_memory"} <= used["IExecutionContext"]
    assert {"size", "dtype"} <= used["Weights"]
    assert {"create_network", "create_builder_config", "create_optimization_profile",
            "build_serialized_network"} <= used["Builder"]
    assert {"parse_from_file", "get_error", "num_errors"} <= used["OnnxParser"]  # from the file: no second copy
    assert {"set_memory_pool_limit", "get_memory_pool_limit", "add_optimization_profile", "set_timing_cache",
            "create_timing_cache", "get_timing_cache", "set_flag"} <= used["IBuilderConfig"]
    assert {"device_memory_size_v2"} <= used["ICudaEngine"] and {"deserialize_cuda_engine"} <= used["Runtime"]
    problems = [f"{cls}.{member}" for cls, members in sorted(used.items()) for member in sorted(members)
                if member not in real_api["classes"][cls]]
    assert problems == []


def test_the_fake_has_the_real_names_kinds_and_signatures(real_api):
    assert fake_mismatches(real_api) == []


def test_classes_sdtrt_constructs_have_public_constructors(real_api):
    made = project_constructors()
    assert made == {"Builder", "OnnxParser", "Runtime", "Logger", "Refitter", "Weights"}
    for name in made:
        assert real_api["classes"][name]["__init__"]["signatures"], name


def test_the_contract_catches_a_misspelt_name(real_api, monkeypatch):
    assert missing_chains(real_api, {("MemoryPoolType", "WORKSPCE")}) == ["trt.MemoryPoolType.WORKSPCE"]

    def set_tensor_adress(self, name, memory):  # misspelt method in the fake
        return True

    monkeypatch.setattr(fakes.IExecutionContext, "set_tensor_adress", set_tensor_adress, raising=False)

    def set_shape(self, input, minimum, opt, max):  # wrong parameter name
        pass

    monkeypatch.setattr(fakes.IOptimizationProfile, "set_shape", set_shape)
    problems = fake_mismatches(real_api)
    assert "IExecutionContext.set_tensor_adress" in problems
    assert any(p.startswith("IOptimizationProfile.set_shape(input, minimum, opt, max) matches no overload") for p in problems)


def test_weak_typing_names_are_gone_in_11_and_unused_by_sdtrt(real_api):
    chains = project_chains()
    assert {c for c in chains if c[:1] == ("BuilderFlag",)} <= {("BuilderFlag", "REFIT")}  # no precision flags
    if real_api["version"].startswith("11."):
        assert "FP16" not in real_api["classes"].get("BuilderFlag", {"FP16": 1}) or "BuilderFlag" not in real_api["module"]


# ---- cuda-python: the runtime calls sdtrt makes, and the fake's, against the real cuda-bindings -------------

CUDA_WHEELS = ("12.8.0", "12.9.4", "13.0.0", "13.5.0")  # the oldest the extras admit, and the newest, per major
CUDA_SOURCES = sorted((Path(__file__).parents[3] / "runtime").rglob("*.py"))

CUDA_DUMP = r"""
import inspect, json
from cuda.bindings import runtime as rt
import cuda.bindings
out = {"version": cuda.bindings.__version__, "functions": {}, "enums": {}, "values": []}
for name in dir(rt):
    if not name.startswith("cuda"):
        continue
    obj = getattr(rt, name)
    if isinstance(obj, type) and hasattr(obj, "__members__"):
        out["enums"][name] = sorted(obj.__members__)
    elif callable(obj) and not isinstance(obj, type):
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            continue
        out["functions"][name] = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    else:
        out["values"].append(name)
print(json.dumps(out))
"""


def _site_with(tmp_path_factory, requirement: str, key: str) -> Path:
    root = tmp_path_factory.mktemp(key)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                           requirement, "cuda-pathfinder", "-d", str(root)], capture_output=True, text=True)
    wheels = sorted(root.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) < 2:
        pytest.skip(f"cannot download {requirement} (no package registry?): {proc.stderr.strip()[-200:]}")
    site = root / "site"
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(site)
    return site


@pytest.fixture(scope="session", params=CUDA_WHEELS)
def real_cuda(request, tmp_path_factory):
    site = _site_with(tmp_path_factory, f"cuda-bindings=={request.param}", f"cuda{request.param}")
    out = subprocess.run([sys.executable, "-c", CUDA_DUMP], env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    api = json.loads(out.stdout)
    assert api["version"] == request.param
    return api, site


def cuda_uses() -> tuple[dict[str, set[int]], set[tuple[str, ...]]]:
    """Every ``cudart.NAME(...)`` call (with its positional argument counts) and ``cudart.A.B`` chain in runtime/."""
    calls: dict[str, set[int]] = {}
    chains = set()
    for path in CUDA_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                value = node.func.value
                if isinstance(value, ast.Name) and value.id == "cudart":
                    calls.setdefault(node.func.attr, set()).add(len(node.args))
                elif isinstance(value, ast.Attribute) and value.attr == "cudart":  # self.cudart.X(...)
                    calls.setdefault(node.func.attr, set()).add(len(node.args))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                base = node.value.value
                is_cudart = (isinstance(base, ast.Name) and base.id == "cudart") or \
                            (isinstance(base, ast.Attribute) and base.attr == "cudart")
                if is_cudart:
                    chains.add((node.value.attr, node.attr))
    return calls, chains


def cuda_problems(api: dict, calls: dict[str, set[int]], chains) -> list[str]:
    problems = []
    for name, counts in sorted(calls.items()):
        params = api["functions"].get(name)
        if params is None:
            problems.append(f"cudart.{name} does not exist")
            continue
        problems += [f"cudart.{name} takes {len(params)} arguments ({', '.join(params)}), sdtrt passes {n}"
                     for n in sorted(counts) if n != len(params)]
    for enum, member in sorted(chains):
        if enum in api["functions"]:
            continue
        if member not in api["enums"].get(enum, []):
            problems.append(f"cudart.{enum}.{member} does not exist")
    return problems


def test_every_cuda_call_sdtrt_makes_exists_with_that_many_arguments(real_cuda):
    api, _ = real_cuda
    calls, chains = cuda_uses()
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamBeginCapture", "cudaGraphExecDestroy"} <= set(calls)
    assert ("cudaError_t", "cudaSuccess") in chains  # the scan sees the code
    assert cuda_problems(api, calls, chains) == []
    assert "cudaStreamNonBlocking" in api["values"]


def test_the_fake_cudart_has_the_real_names_and_parameters(real_cuda):
    api, _ = real_cuda
    problems = []
    for name in fakes.FAKED_CUDART:
        params = [p for p in inspect.signature(getattr(fakes.FakeCudart, name)).parameters if p != "self"]
        if api["functions"].get(name) != params:
            problems.append(f"{name}({', '.join(params)}) vs real {api['functions'].get(name)}")
    for enum in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode"):
        mine = [m for m in vars(getattr(fakes.FakeCudart, enum)) if m.startswith("cuda")]
        problems += [f"{enum}.{m}" for m in mine if m not in api["enums"][enum]]
    assert problems == []


def test_the_cuda_contract_catches_a_wrong_call(real_cuda):
    api, _ = real_cuda
    assert cuda_problems(api, {"cudaMemcpyAsync": {4}, "cudaMallocc": {1}}, {("cudaMemcpyKind", "HostToDevice")}) == [
        "cudart.cudaMallocc does not exist",
        "cudart.cudaMemcpyAsync takes 5 arguments (dst, src, count, kind, stream), sdtrt passes 4",
        "cudart.cudaMemcpyKind.HostToDevice does not exist"]


def test_real_cuda_python_without_a_driver_gives_one_clear_line(real_cuda, tmp_path):
    """Where this machine has no NVIDIA driver, the real bindings answer as they do on a GPU box without one:
    sdtrt must say so in one line (cuda-bindings 12.8 raises RuntimeError there instead of returning an error)."""
    from sdtrt.runtime.backends import cuda_driver_info

    if cuda_driver_info()[0]:
        pytest.skip("this machine has an NVIDIA driver")
    _, site = real_cuda
    import sdtrt

    repo_site = str(Path(sdtrt.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), repo_site, os.environ.get("PYTHONPATH", "")]))
    probe = ("from sdtrt.runtime.tensorrt import api\n"
             "from sdtrt.runtime.backends import BackendError, _has_cuda_device\n"
             "assert _has_cuda_device() is False\n"
             "try:\n    api.device_info(api.import_cudart())\nexcept BackendError as ex:\n    print(ex)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("no NVIDIA driver found"), out.stdout
    doctor = subprocess.run([sys.executable, "-m", "sdtrt", "doctor"], env=env, capture_output=True, text=True)
    assert doctor.returncode == 0 and "Traceback" not in doctor.stderr, doctor.stderr[-2000:]
    assert "NVIDIA driver:     not found" in doctor.stdout
