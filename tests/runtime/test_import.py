import subprocess
import sys


def test_runtime_imports_and_generates_without_torch_diffusers_transformers(tiny_fp32):
    out, _ = tiny_fp32
    code = f"""
import sys
for m in ("torch", "diffusers", "transformers"):
    sys.modules[m] = None  # any import of them now raises ImportError
from sdtrt.runtime import Pipeline
result = Pipeline.from_dir({str(out)!r})("a cat", num_inference_steps=2, height=64, width=64, seed=0)
assert result.images[0].size == (64, 64)
assert not any(k.split(".")[0] in ("torch", "diffusers", "transformers") and v is not None for k, v in sys.modules.items())
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
