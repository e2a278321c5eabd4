"""Writes tests/data/v1_checkpoint.safetensors and its expected outputs with the code of commit db8dc3e (format v1)."""
import sys, torch
sys.path.insert(0, ".")
import bivlm_kernels
assert "/tmp/oldrepo" in bivlm_kernels.__file__, bivlm_kernels.__file__
from bivlm_kernels import QuantLinear, checkpoint, ops
from bivlm_kernels.formats import QuantizedSegment, QuantizedWeight
torch.manual_seed(1234)
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(96, 40)          # 1-bit lut, g32
        self.b = torch.nn.Linear(128, 24, bias=False)   # 2-bit lut, g64
        self.c = torch.nn.Linear(64, 33)          # 4-bit affine, g32
        self.d = torch.nn.Linear(96, 17)          # perm + 2-bit and 1-bit segments, g32
    def forward(self, x):
        return self.a(x[..., :96]), self.b(x[..., :128]), self.c(x[..., :64]), self.d(x[..., :96])
net = Net().half()
net.a = QuantLinear.from_linear(net.a, 1, 32)
net.b = QuantLinear.from_linear(net.b, 2, 64)
net.c = QuantLinear.from_linear(net.c, 4, 32)
n = 17
segs = [QuantizedSegment(2, torch.randint(0, 4, (n, 32)), codebook=torch.randn(n, 1, 4).half()),
        QuantizedSegment(1, torch.randint(0, 2, (n, 64)), codebook=torch.randn(n, 2, 2).half())]
net.d = QuantLinear.from_quantized(QuantizedWeight(segs, 32, perm=torch.randperm(96).int()),
                                   bias=torch.randn(n).half(), dtype=torch.float16)
checkpoint.save(net, sys.argv[1])
x = torch.randn(3, 128).half()
ops.set_backend("reference")
with torch.no_grad():
    ys = net(x)
torch.save({"x": x, "y": list(ys)}, sys.argv[2])
print("ok", checkpoint.read_metadata(sys.argv[1])["format_version"])
