"""`import bivlm_kernels` needs no GPU, no compiled extension, no Triton, no transformers, and queries no device."""
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys, torch
    def forbidden(*a, **k):
        raise AssertionError("a GPU query ran at import")
    for name in ("is_available", "device_count", "current_device", "get_device_properties", "get_device_name"):
        setattr(torch.cuda, name, forbidden)
    # Make the optional pieces unimportable: importing the package must not need them.
    for mod in ("triton", "transformers", "bivlm_kernels._C", "bivlm_kernels._C_cpu"):
        sys.modules[mod] = None
    import bivlm_kernels
    from bivlm_kernels import QuantLinear, ops, formats, checkpoint
    x = torch.randn(2, 128)
    q = QuantLinear.from_linear(torch.nn.Linear(128, 8), 1, 64, dtype=torch.float32)
    assert q(x).shape == (2, 8)
    loaded = [m for m in ("bivlm_kernels.backends.triton", "bivlm_kernels.backends.cuda.register", "bivlm_kernels.quant")
              if m in sys.modules and sys.modules[m] is not None]
    assert not loaded, loaded
    print("ok")
""")


def test_import_without_gpu_extension_or_optional_deps():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
