"""GPU probe (not a test): full-shape random Mimi on CUDA vs upstream moshi; CUDA-graph
capture of our streaming steps; per-frame timings."""

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "src")]
from personaplex.model.config import MimiConfig  # noqa: E402
from personaplex.model.mimi import load_mimi  # noqa: E402
from tests.fixtures.tiny_mimi import moshi_mimi, test_audio, write_tiny_mimi  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda"
cfg = MimiConfig()
path = os.path.join(tempfile.mkdtemp(), "mimi.safetensors")
write_tiny_mimi(path, cfg, seed=0)
print(torch.__version__, torch.cuda.get_device_name())

ours = load_mimi(path, cfg, device=dev)
ref = moshi_mimi(path, cfg).to(dev)
FR = 1920
N = 40
pcm = test_audio(2, N * FR, seed=1).to(dev)

st = ours.init_stream(2)
codes = torch.cat([ours.encode_step(pcm[..., i * FR:(i + 1) * FR], st) for i in range(N)], -1)
with torch.no_grad(), ref.streaming(2):
    rcodes = torch.cat([ref.encode(pcm[..., i * FR:(i + 1) * FR]) for i in range(N)], -1)
print("cuda stream encode == upstream:", torch.equal(codes, rcodes), (codes != rcodes).float().mean().item())
whole = ours.encode(pcm)
with torch.no_grad():
    rwhole = ref.encode(pcm)
print("cuda whole encode == upstream:", torch.equal(whole, rwhole), (whole != rwhole).float().mean().item())
dec = torch.cat([ours.decode_step(codes[..., i:i + 1], st) for i in range(N)], -1)
with torch.no_grad(), ref.streaming(2):
    rdec = torch.cat([ref.decode(codes[..., i:i + 1]) for i in range(N)], -1)
print("cuda stream decode rel err:", ((dec - rdec).norm() / rdec.norm()).item())


def graphed(model, batch):
    state = model.init_stream(batch)
    pcm_in = torch.zeros(batch, 1, FR, device=dev)
    codes_in = torch.zeros(batch, 8, 1, dtype=torch.long, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.encode_step(pcm_in, state)
            model.decode_step(codes_in, state)
    torch.cuda.current_stream().wait_stream(side)
    state.reset()
    g_enc, g_dec = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_enc):
        codes_out = model.encode_step(pcm_in, state)
    with torch.cuda.graph(g_dec):
        pcm_out = model.decode_step(codes_in, state)
    state.reset()
    return state, pcm_in, codes_in, g_enc, codes_out, g_dec, pcm_out


# Graph replay must equal eager streaming.
state, pcm_in, codes_in, g_enc, codes_out, g_dec, pcm_out = graphed(ours, 2)
gc, gd = [], []
for i in range(N):
    pcm_in.copy_(pcm[..., i * FR:(i + 1) * FR])
    g_enc.replay()
    gc.append(codes_out.clone())
    codes_in.copy_(codes[..., i:i + 1])
    g_dec.replay()
    gd.append(pcm_out.clone())
gc, gd = torch.cat(gc, -1), torch.cat(gd, -1)
print("graph encode == eager:", torch.equal(gc, codes), " graph decode rel err:", ((gd - dec).norm() / dec.norm()).item())


def timed(fn, frames=120, warm=10):
    times = []
    for i in range(frames + warm):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        if i >= warm:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return f"median {statistics.median(times):.2f} p99 {times[int(0.99 * len(times)) - 1]:.2f}"


for dtype in (torch.float32, torch.bfloat16):
    model = load_mimi(path, cfg, device=dev, dtype=dtype)
    for batch in (1, 8, 32):
        state, pcm_in, codes_in, g_enc, codes_out, g_dec, pcm_out = graphed(model, batch)
        pcm_b = test_audio(batch, FR, seed=3).to(dev)
        pcm_in.copy_(pcm_b)
        print(dtype, "B", batch,
              "| graph enc", timed(lambda i: g_enc.replay()), "| graph dec", timed(lambda i: g_dec.replay()))
        st = model.init_stream(batch)
        c = torch.zeros(batch, 8, 1, dtype=torch.long, device=dev)
        print(dtype, "B", batch, "| eager enc", timed(lambda i: model.encode_step(pcm_b, st), 40),
              "| eager dec", timed(lambda i: model.decode_step(c, st), 40))

# Upstream peer: moshi's own streaming (its CUDAGraphed wrappers), fp32.
for batch in (1, 8, 32):
    pcm_b = test_audio(batch, FR, seed=3).to(dev)
    c = torch.zeros(batch, 8, 1, dtype=torch.long, device=dev)
    with torch.no_grad(), ref.streaming(batch):
        print("upstream fp32 B", batch, "| enc", timed(lambda i: ref.encode(pcm_b)), "| dec", timed(lambda i: ref.decode(c)))
