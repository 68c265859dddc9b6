"""Runtime: input checks, backend selection, the plan cache, the custom op, torch.compile."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import dilated_compiler as dc
from dilated_compiler import AttentionSpec, Branch, compile_attention, reference, runtime
from dilated_compiler.lowering import BackendError
from dilated_compiler.planner import PlanError
from dilated_compiler.runtime import module as rt_module
from dilated_compiler.runtime import op as ops
from conftest import assert_eager_path_matches_op, make_qkv

SPEC = AttentionSpec((Branch(8, 1), Branch(16, 2)))


@pytest.fixture(autouse=True)
def _fresh_cache():
    runtime.clear_cache()
    yield
    runtime.set_cache_size(128)


def test_compile_attention_accepts_every_source(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.to_yaml())
    for source in (SPEC, SPEC.to_dict(), SPEC.to_yaml(), str(path), path):
        attn = compile_attention(source, backend="torch")
        assert isinstance(attn, torch.nn.Module) and attn.spec == SPEC


def test_returns_out_or_out_and_lse():
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 16, 2, 8)
    out = attn(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out2, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out, out2) and lse.shape == (1, 2, 16) and lse.dtype == torch.float32


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have shape"),
        (lambda q, k, v: (q, k[:, :8], v[:, :8]), ValueError, "must match q in batch, seq and head_dim"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "must match q in batch, seq"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), ValueError, "must match q in batch, seq and head_dim"),
        (lambda q, k, v: (q, k, v.double()), TypeError, "share one dtype"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "one device"),
        (lambda q, k, v: [t.to(torch.float8_e4m3fn) for t in (q, k, v)], TypeError, "dtype torch.float8_e4m3fn; allowed"),
        (lambda q, k, v: (q, k, v[..., :4]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "dtype torch.int32"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
        (lambda q, k, v: (q[:, :, :1], k[:, :, :1], v[:, :, :1]), ValueError, "heads >= number of branches"),
        (lambda q, k, v: (q[:, :, :3].contiguous(), k[:, :, :2], v[:, :, :2]), ValueError, r"kv heads \(2\) must divide heads \(3\)"),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "every dimension must be >= 1"),
        (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_before_work(make, error, match):
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 16, 4, 8)
    with pytest.raises(error, match=match):
        attn(*make(q, k, v))
    assert runtime.cache_info().misses == 0  # nothing was compiled


def test_bad_key_padding_mask():
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 16, 2, 8)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        attn(q, k, v, key_padding_mask=torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"\(1, 16\)"):
        attn(q, k, v, key_padding_mask=torch.zeros(1, 15, dtype=torch.bool))


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        compile_attention(SPEC, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_is_an_error():
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter runs CPU tensors")
    q, k, v = make_qkv(1, 16, 2, 8)
    try:
        attn = compile_attention(SPEC, backend="triton")
    except BackendError as e:
        assert "triton" in str(e)
        return
    with pytest.raises(BackendError, match="triton"):
        attn(q, k, v)


def test_auto_is_torch_on_cpu():
    assert runtime.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_cache_hits_misses_and_keys():
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 16, 2, 8)
    attn(q, k, v)
    attn(q, k, v)
    assert runtime.cache_info()[:2] == (1, 1)
    attn(q.double(), k.double(), v.double())  # new dtype
    q2, k2, v2 = make_qkv(1, 24, 2, 8)
    attn(q2, k2, v2)  # new shape
    compile_attention(AttentionSpec(SPEC.branches, causal=True), backend="torch")(q, k, v)  # new spec
    compile_attention(SPEC.to_yaml(), backend="torch")(q, k, v)  # same spec, another module: a hit
    info = runtime.cache_info()
    assert (info.hits, info.misses, info.currsize) == (2, 4, 4)


def test_cache_is_bounded_lru():
    runtime.set_cache_size(2)
    attn = compile_attention(SPEC, backend="torch")
    shapes = [make_qkv(1, n, 2, 8) for n in (8, 9, 10)]
    for qkv in shapes:
        attn(*qkv)
    assert runtime.cache_info().currsize == 2  # shapes 1 and 2; 0 was evicted
    attn(*shapes[1])  # a hit: 1 becomes the most recently used
    assert runtime.cache_info().hits == 1
    attn(*shapes[0])  # evicted before: a miss, which evicts the least recently used (2, not 1, the older entry)
    assert runtime.cache_info().misses == 4
    attn(*shapes[1])
    assert runtime.cache_info().hits == 2
    attn(*shapes[2])
    assert runtime.cache_info().misses == 5
    with pytest.raises(ValueError, match="cache size"):
        runtime.set_cache_size(0)


@pytest.mark.parametrize("text", ["0", "-1", "abc", "2.5", ""])
def test_cache_size_variable_is_checked(monkeypatch, text):
    from dilated_compiler.runtime import cache
    monkeypatch.setenv("DILATED_COMPILER_CACHE_SIZE", text)
    with pytest.raises(ValueError, match=f"DILATED_COMPILER_CACHE_SIZE .* integer >= 1; got '{text}'"):
        cache._size_from_env()
    monkeypatch.setenv("DILATED_COMPILER_CACHE_SIZE", "5")
    assert cache._size_from_env() == 5


def test_bad_cache_size_variable_fails_the_first_call_not_the_import(monkeypatch):
    """The variable is read when the cache is first used: importing the package (and the CLI's --help) works, and
    the first call reports the variable before compiling anything."""
    from dilated_compiler.runtime import cache
    env = {**os.environ, "DILATED_COMPILER_CACHE_SIZE": "0"}
    result = subprocess.run([sys.executable, "-c", "import dilated_compiler"], env=env,
                                          capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(cache, "_maxsize", None)
    monkeypatch.setenv("DILATED_COMPILER_CACHE_SIZE", "0")
    runtime.clear_cache()
    with pytest.raises(ValueError, match="DILATED_COMPILER_CACHE_SIZE .* integer >= 1; got '0'"):
        compile_attention(SPEC, backend="torch")(*make_qkv(1, 16, 2, 8))
    monkeypatch.setenv("DILATED_COMPILER_CACHE_SIZE", "7")
    info = runtime.cache_info()
    assert info.misses == 0 and info.currsize == 0 and info.maxsize == 7  # nothing was compiled


def test_cache_size_must_be_a_plain_integer():
    """set_cache_size takes an int >= 1: True (an int subclass equal to 1), a float or a string is refused."""
    for bad in (True, False, 2.0, "4", None):
        with pytest.raises(ValueError, match="cache size .* integer >= 1"):
            runtime.set_cache_size(bad)
    runtime.set_cache_size(1)
    assert runtime.cache_info().maxsize == 1


def test_cache_default_size_and_shrinking(monkeypatch):
    """Without DILATED_COMPILER_CACHE_SIZE the cache keeps 128 plans (as documented); shrinking it evicts the least
    recently used plans at once, keeping the most recent."""
    from dilated_compiler.runtime import cache
    monkeypatch.delenv("DILATED_COMPILER_CACHE_SIZE", raising=False)
    monkeypatch.setattr(cache, "_maxsize", None)
    assert runtime.cache_info().maxsize == 128
    attn = compile_attention(SPEC, backend="torch")
    shapes = [make_qkv(1, n, 2, 8) for n in (8, 9, 10)]
    for qkv in shapes:
        attn(*qkv)
    attn(*shapes[0])  # a hit: 0 is now the most recently used
    runtime.set_cache_size(1)
    assert runtime.cache_info()[1:] == (3, 1, 1)
    attn(*shapes[0])
    assert runtime.cache_info().hits == 2  # 0 was kept
    attn(*shapes[2])
    assert runtime.cache_info().misses == 4


def test_cache_key_has_the_backend():
    """The same spec, shapes, dtype and device compiled for another backend is another plan."""
    from dilated_compiler.runtime.cache import lowered
    key = compile_attention(SPEC, backend="torch").spec_key
    by_torch = lowered(key, "torch", (1, 64, 2, 16), 2, torch.float32, torch.device("cpu"))
    by_triton = lowered(key, "triton", (1, 64, 2, 16), 2, torch.float32, torch.device("cpu"))
    assert (by_torch.name, by_triton.name) == ("torch", "triton")
    assert runtime.cache_info().misses == 2


@pytest.mark.parametrize("dtype,size", [(torch.float16, 2), (torch.float32, 4), (torch.float64, 8)])
def test_plan_counts_bytes_of_the_inputs_dtype(dtype, size):
    """The compiled plan counts the memory traffic in elements of the inputs' dtype."""
    text = compile_attention(SPEC, backend="torch").kernel_source(16, 2, 8, dtype=dtype)
    assert f"bytes moved (fused fwd, {size}-byte elements)" in text


def test_get_lowering_of_an_unknown_backend():
    """The lowering registry names the backends it has when asked for one it lacks."""
    from dilated_compiler.lowering import get_lowering
    with pytest.raises(BackendError, match=r"unknown backend 'nope'; available: \[.*'torch'"):
        get_lowering("nope")


def test_cache_key_has_the_device():
    """The same spec, shape and dtype on another device is another plan (a Triton lowering for CUDA can be built,
    not run, without a GPU)."""
    from dilated_compiler.runtime.cache import lowered
    runtime.clear_cache()
    attn = compile_attention(SPEC, backend="triton")
    on_cpu = lowered(attn.spec_key, "triton", (1, 64, 2, 16), 2, torch.float16, torch.device("cpu"))
    on_cuda = lowered(attn.spec_key, "triton", (1, 64, 2, 16), 2, torch.float16, torch.device("cuda"))
    assert on_cpu is not on_cuda and (on_cpu.device.type, on_cuda.device.type) == ("cpu", "cuda")
    assert runtime.cache_info().misses == 2


def test_cache_is_thread_safe():
    """Threads sharing the cache get right results and consistent counts. (Under the GIL, CPython 3.11 switches
    threads only at calls and backward jumps, so the dict updates the lock guards do not interleave here: this
    cannot show a missing lock, which matters on free-threaded builds.)"""
    attn = compile_attention(SPEC, backend="torch")
    inputs = [make_qkv(1, n, 2, 8, seed=n) for n in range(8, 16)]
    expected = [attn(*x) for x in inputs]
    runtime.clear_cache()
    errors, results = [], {}

    def work(i):
        try:
            for _ in range(5):
                results[i] = attn(*inputs[i % len(inputs)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, out in results.items():
        assert torch.equal(out, expected[i % len(inputs)])
    info = runtime.cache_info()
    assert info.currsize == len(inputs) and info.hits + info.misses == 16 * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_opcheck(mode, dtype):
    """The fake results match the real ones (float64: aux holds a float64 lse, also in grouped mode)."""
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment=mode, causal=True)
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(2, 20, 3, 8, dtype=dtype, requires_grad=True)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 3] = True
    for m in (None, mask):
        torch.library.opcheck(ops.attention, (q, k, v, m, attn.spec_key, "torch"))
    # inputs that are views of a (B, H, N, D) layout: the fake results must have the real results' strides
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert not qt.is_contiguous()
    torch.library.opcheck(ops.attention, (qt, kt, vt, mask, attn.spec_key, "torch"))


@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_torch_compile_fullgraph_matches_eager(mode):
    spec = AttentionSpec((Branch(8, 1), Branch(16, 4)), head_assignment=mode)
    attn = compile_attention(spec, backend="torch")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.attn = attn

        def forward(self, q, k, v):
            out, lse = self.attn(self.proj(q), k, v, return_lse=True)
            return out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()

    model = Model()
    q, k, v = make_qkv(2, 24, 4, 8, requires_grad=True)
    eager = model(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_fullgraph():
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 16, 2, 8, requires_grad=True)
    fn = torch.compile(lambda q, k, v: attn(q, k, v) * 2, fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attn(q, k, v) * 2)
    fn(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # q, k, v as views of a (B, H, N, D) layout: inductor checks the op's results against the fake's strides
    x = torch.randn(1, 2, 16, 8, requires_grad=True)
    fn = torch.compile(lambda x: attn(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2)), fullgraph=True)
    got = fn(x)
    torch.testing.assert_close(got, attn(*(x.transpose(1, 2),) * 3))
    (grad,) = torch.autograd.grad(got.sum(), x)
    (want,) = torch.autograd.grad(attn(*(x.transpose(1, 2),) * 3).sum(), x)
    torch.testing.assert_close(grad, want)


def test_kernel_source_and_plan_are_readable():
    attn = compile_attention(SPEC, backend="torch")
    text = attn.kernel_source(40, 4, 16)
    assert "attend_b0_w8_r1_o0_full" in text and "unflatten" in text and "useful FLOPs" in text
    plan = attn.plan(40, 4, 16)
    assert plan.flops > 0
    assert "H=4 D=16 Hkv=2;" in attn.kernel_source(40, 4, 16, kv_heads=2)
    assert "H=4 D=16 Hkv=4;" in attn.kernel_source(40, 4, 16)
    for kv_heads in (0, 3):  # kv heads must divide the heads; 0 is not taken for "as many as the heads"
        with pytest.raises(PlanError, match="Hkv: got 0|kv heads"):
            attn.kernel_source(40, 4, 16, kv_heads=kv_heads)
    with pytest.raises(TypeError, match=r"dtype: got 'bf16'; allowed: a torch.dtype"):
        attn.kernel_source(40, 4, 16, dtype="bf16")
    assert "compile_attention" in dc.__all__


def test_saved_module_runs_in_a_new_process(tmp_path):
    """The spec registry is per process: a module saved with torch.save (or sent to a spawned worker) registers
    its spec again when unpickled, in a layer as well as alone."""
    import subprocess
    import sys

    from dilated_compiler.nn import DilatedMultiheadAttention

    spec = AttentionSpec((Branch(4, 1), Branch(8, 2)), name="saved-in-another-process")
    torch.save({"attn": compile_attention(spec), "mha": DilatedMultiheadAttention(8, 2, spec)}, tmp_path / "m.pt")
    code = (
        "import torch\n"
        "from dilated_compiler import reference\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "q, k, v = (torch.randn(1, 16, 2, 4, dtype=torch.float64) for _ in range(3))\n"
        "err = (d['attn'](q, k, v) - reference.attention(q, k, v, d['attn'].spec)).abs().max().item()\n"
        "x = torch.randn(1, 16, 8)\n"
        "print(err, tuple(d['mha'](x, x, x)[0].shape))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    err, shape = run.stdout.split(" ", 1)
    assert float(err) < 1e-12 and shape.strip() == "(1, 16, 8)", run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_eager_path_matches_the_custom_op(mode, dtype):
    """Plain eager calls take runtime.op.EagerAttention, which skips the custom op's dispatch (its host time): the
    same plan, so bitwise the custom op's out, lse and gradients, with grouped-query heads and key padding."""
    offset = 1 if mode == "grouped" else None   # "all" mode takes each head's offset from the head
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2), Branch(12, 3, offset=offset)), head_assignment=mode,
                         causal=True)
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(2, 30, 4, 8, dtype=dtype, kv_heads=2)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 5:9] = True
    for m in (None, mask):
        assert_eager_path_matches_op(attn, q, k, v, m)


def test_custom_op_wherever_operators_are_watched():
    """The eager path is for plain calls only: under a dispatch mode (FakeTensorMode here), a functorch transform,
    torch.compile, or with a tensor subclass the module calls the custom op, which such tools see as one operator."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    attn = compile_attention(SPEC, backend="torch")
    q, k, v = make_qkv(1, 32, 2, 8)
    assert ops.eager_ok(q, k, v, None) and ops.eager_ok(torch.nn.Parameter(q))
    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
    with mode:
        assert not ops.eager_ok(fq, fk, fv, None)
        out = attn(fq, fk, fv)   # the op's fake implementation: no real kernels on fake tensors
    assert type(out).__name__ == "FakeTensor" and out.shape == q.shape
    seen = []
    torch.func.vmap(lambda x: seen.append(ops.eager_ok(x)) or x)(q)
    assert seen == [False]

    class Marked(torch.Tensor):
        pass
    assert not ops.eager_ok(q.as_subclass(Marked))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(lambda q, k, v: attn(q, k, v), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attn(q, k, v), rtol=0, atol=0)
    targets = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.dilated_compiler.attention.default in targets, targets


def test_second_order_gradients_are_an_error():
    """First-order gradients only (README, Semantics): a backward through the gradients raises, saying so and
    pointing at the reference, whose gradients of gradients are exact."""
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), causal=True)
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(1, 16, 2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(attn(q, k, v).sum(), q, create_graph=True)
    (g_ref,) = torch.autograd.grad(reference.attention(q, k, v, spec).sum(), q, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)   # the first backward still runs under create_graph
    with pytest.raises(RuntimeError, match=r"no double backward.*dilated_compiler\.reference\.attention"):
        torch.autograd.grad(g.sum(), q)
    assert torch.autograd.gradgradcheck(lambda q, k, v: reference.attention(q, k, v, spec), (q, k, v))


# "auto" on a CUDA device falls back to torch when Triton is unavailable (no GPU needed: just a device object)
def test_auto_backend_on_cuda_without_triton_is_torch(monkeypatch):
    monkeypatch.setattr(rt_module, "_triton_available", lambda: False)
    assert rt_module.resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(rt_module, "_triton_available", lambda: True)
    assert rt_module.resolve_backend("auto", torch.device("cuda")) == "triton"


# a loss on lse alone (no gradient reaches out) backpropagates, matching the reference
def test_gradient_of_lse_alone():
    spec = AttentionSpec((Branch(4, 1), Branch(8, 2)), head_assignment="grouped")
    attn = compile_attention(spec, backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _, lse = attn(q, k, v, return_lse=True)
    grads = torch.autograd.grad(torch.where(torch.isinf(lse), 0, lse).sum(), (q, k))
    _, ref_lse = reference.attention(q, k, v, spec, return_lse=True)
    ref = torch.autograd.grad(torch.where(torch.isinf(ref_lse), 0, ref_lse).sum(), (q, k))
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e)


# a key padding mask on another device than q is refused
def test_key_padding_mask_on_another_device():
    attn = compile_attention(AttentionSpec((Branch(4, 1),)), backend="torch")
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta, the inputs on cpu"):
        attn(q, q, q, key_padding_mask=torch.zeros(1, 8, dtype=torch.bool, device="meta"))
