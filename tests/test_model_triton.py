"""attn_implementation="triton" against "sdpa" on tiny checkpoints: logits, decode steps and
greedy tokens. On CPU this runs the kernels under TRITON_INTERPRET=1 (set by conftest)."""

import copy

import pytest
import torch

pytest.importorskip("triton")

from llava_next import KVCache, LlavaNextForConditionalGeneration  # noqa: E402
from tiny import SMALL, hf_checkpoint, image_inputs, prompt_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=["mistral", "yi"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # head_dim 16 on the text side, 16 on the vision side; GQA for both families here.
    hf = hf_checkpoint(folder, request.param, **SMALL)
    load = lambda attn: LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation=attn,
                                                                          device_map=DEVICE)
    return hf.config, load("sdpa"), load("triton")


def batch(config):
    ids, mask = prompt_ids(config, [[(45, 80)], [(150, 40)]], [3, 9])
    pv, sizes = image_inputs(config, [(45, 80), (150, 40)])
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pv.to(DEVICE),
                image_sizes=sizes)


def test_prefill_logits_match_sdpa(models):
    config, sdpa, triton = models
    inputs = batch(config)
    with torch.no_grad():
        want = sdpa(**inputs).logits
        got = triton(**inputs).logits
    real = inputs["attention_mask"].bool()
    diff = (got - want)[real].abs().max().item()
    print(f"prefill logits, triton vs sdpa: max abs diff {diff:.2e}")
    assert diff <= 2e-4


@pytest.mark.parametrize("fuse", ["separate", "fused_projections", "decode_kernels", "auto"])
def test_cached_prefill_and_decode_steps_match_sdpa(models, fuse, monkeypatch):
    """With a cache the triton model uses the fused rope + cache-write kernel, flash attention for
    the prompt and flash-decoding for each new token; with fuse_projections, q/k/v come out of
    one product as strided views, which the rope kernel must read as such; with decode kernels,
    each decode step's layers run as decode_linear kernels and rope_decode_attention (decode_forward);
    auto, the default once fused: decode_forward on CUDA, never on CPU."""
    from llava_next.language import LlamaDecoderLayer

    config, sdpa, triton = models
    if fuse == "fused_projections":
        triton = copy.deepcopy(triton).fuse_projections().enable_decode_kernels(False)
    elif fuse == "decode_kernels":
        triton = copy.deepcopy(triton).enable_decode_kernels()
    elif fuse == "auto":
        triton = copy.deepcopy(triton).fuse_projections()
    import llava_next.kernels as K

    decode_calls, fused_attention_calls = [], []
    fast, fused_attention = LlamaDecoderLayer.decode_forward, K.rope_decode_attention
    monkeypatch.setattr(LlamaDecoderLayer, "decode_forward",
                        lambda self, x, *a, **k: decode_calls.append(x.shape) or fast(self, x, *a, **k))
    monkeypatch.setattr(K, "rope_decode_attention",
                        lambda *a, **k: fused_attention_calls.append(1) or fused_attention(*a, **k))
    inputs = batch(config)
    T = inputs["input_ids"].shape[1]
    steps = torch.randint(3, 1000, (2, 3), device=DEVICE)
    outs = []
    for model in (sdpa, triton):
        cache = KVCache.for_model(model, 2, T + 3)
        with torch.no_grad():
            logits = [model(**inputs, cache=cache).logits[:, -1]]
            for i in range(3):
                logits.append(model(input_ids=steps[:, i:i + 1], cache=cache,
                                    cache_pos=torch.tensor(T + i, device=DEVICE)).logits[:, -1])
        outs.append(torch.stack(logits, 1))
    diff = (outs[1] - outs[0]).abs().max().item()
    print(f"cached prefill + 3 decode steps, triton vs sdpa: max abs diff {diff:.2e}")
    assert diff <= 2e-4
    n_layers = config.text_config.num_hidden_layers
    fast_path = fuse == "decode_kernels" or (fuse == "auto" and DEVICE == "cuda")
    assert decode_calls == ([(2, 1, config.text_config.hidden_size)] * 3 * n_layers if fast_path else [])
    assert len(fused_attention_calls) == len(decode_calls)  # each decode step's attention in one kernel


def test_decode_kernels_greedy_tokens_and_stepping_aside(models):
    """enable_decode_kernels: the same greedy tokens as sdpa; a hook on a layer's MLP, or weights
    no longer laid out by fuse_projections, send the step back to the module path (same result)."""
    config, sdpa, triton = models
    inputs = batch(config)
    want = sdpa.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    model = copy.deepcopy(triton).enable_decode_kernels()
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[]), want)
    layer = model.language_model.model.layers[0]
    x = torch.randn(2, 1, config.text_config.hidden_size, device=DEVICE)
    with torch.no_grad():
        assert layer._decode_weights(x) is not None
        seen = []
        handle = layer.mlp.register_forward_hook(lambda *a: seen.append(1))
        assert layer._decode_weights(x) is None
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[]), want)
        assert len(seen) == 6  # the hook saw the prompt and each of the 5 decode steps
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        assert layer._decode_weights(x) is None  # a global hook must see every module's call
        handle.remove()
        layer.self_attn.o_proj.forward = lambda t: torch.nn.functional.linear(t, layer.self_attn.o_proj.weight)
        assert layer._decode_weights(x) is None  # a forward replaced on the instance (accelerate-style)
        del layer.self_attn.o_proj.forward
        assert layer._decode_weights(x) is not None
        assert layer._decode_weights(x.double()) is None  # another dtype than the weights'
        assert layer._decode_weights(torch.randn(65, 1, x.shape[-1], device=DEVICE)) is None  # too many rows
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert layer._decode_weights(x) is None
    for p in layer.parameters():
        p.requires_grad_(False)
    assert layer._decode_weights(x) is not None  # grad mode on, but nothing needs a gradient
    assert layer._decode_weights(x.clone().requires_grad_()) is None  # an input that needs one
    for p in layer.parameters():
        p.requires_grad_(True)
    assert layer._decode_weights(x) is None  # trainable weights
    with torch.no_grad():
        layer.mlp.up_proj.weight.data = layer.mlp.up_proj.weight.data.clone()  # gate/up no longer back to back
        assert layer._decode_weights(x) is None
    model.enable_decode_kernels(False)
    assert not any(layer.decode_kernels for layer in model.language_model.model.layers)


def test_decode_kernels_by_default_on_cuda_for_a_few_rows(models):
    """A model starts with decode_kernels None: decode_linear for steps of at most
    AUTO_DECODE_ROWS rows on CUDA (where it was timed faster), never on CPU; True raises the limit
    to decode_linear's 64 rows, False turns it off, None restores the default."""
    from llava_next.kernels.decode_linear import MAX_ROWS
    from llava_next.language import AUTO_DECODE_ROWS

    config, _, triton = models
    model = copy.deepcopy(triton).fuse_projections()
    layer = model.language_model.model.layers[0]
    assert layer.decode_kernels is None
    rows = lambda n: torch.randn(n, 1, config.text_config.hidden_size, device=DEVICE)  # noqa: E731
    with torch.no_grad():
        assert (layer._decode_weights(rows(AUTO_DECODE_ROWS)) is not None) == (DEVICE == "cuda")
        assert layer._decode_weights(rows(AUTO_DECODE_ROWS + 1)) is None
        model.enable_decode_kernels(True)
        assert layer._decode_weights(rows(AUTO_DECODE_ROWS + 1)) is not None  # CPU too, under the interpreter
        assert layer._decode_weights(rows(MAX_ROWS + 1)) is None
        model.enable_decode_kernels(False)
        assert layer._decode_weights(rows(1)) is None
        model.enable_decode_kernels(None)
        assert all(layer.decode_kernels is None for layer in model.language_model.model.layers)
        assert (layer._decode_weights(rows(1)) is not None) == (DEVICE == "cuda")
    with pytest.raises(TypeError, match="True, False or None"):
        model.enable_decode_kernels("yes")


def test_greedy_tokens_equal_sdpa(models):
    config, sdpa, triton = models
    inputs = batch(config)
    want = sdpa.generate(**inputs, max_new_tokens=8)
    got = triton.generate(**inputs, max_new_tokens=8)
    assert torch.equal(got, want)


def test_generate_attentions_and_hidden_states_on_the_triton_path(models):
    """generate(output_attentions, output_hidden_states) with "triton": the fused rope + cache-write
    kernel feeds the written-out attention, and a layer's decode kernels (decode_forward) step
    aside for a step that keeps its weights; every step's outputs equal the sdpa model's."""
    config, sdpa, triton = models
    triton = copy.deepcopy(triton).enable_decode_kernels()  # on CPU too
    kw = dict(batch(config), max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True,
              output_attentions=True, output_hidden_states=True)
    want, got = sdpa.generate(**kw), triton.generate(**kw)
    assert torch.equal(got.sequences, want.sequences) and len(got.attentions) == 3
    real = kw["attention_mask"].bool()
    for step, (ga, wa, gh, wh) in enumerate(zip(got.attentions, want.attentions, got.hidden_states, want.hidden_states)):
        assert ga[0].shape == wa[0].shape == (2, config.text_config.num_attention_heads, 1 if step else real.shape[1],
                                              real.shape[1] + step)
        for g, w in zip(ga, wa):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        for g, w in zip(gh, wh):
            torch.testing.assert_close(g[real] if step == 0 else g, w[real] if step == 0 else w, atol=2e-4, rtol=0)


def test_default_attention_is_auto_triton_on_cuda_sdpa_elsewhere(tmp_path, monkeypatch):
    """The default picks by where the tensors are, so .to("cuda") after a CPU load gets the kernels."""
    import llava_next.kernels as K
    from llava_next.attention import kernels_enabled

    hf = hf_checkpoint(tmp_path, "vicuna", **SMALL)
    auto = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    sdpa = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert auto.attn_implementation == "auto"
    assert kernels_enabled("auto", torch.zeros(1)) is False and kernels_enabled("triton", torch.zeros(1))
    called = []
    for name in ("flash_attention", "decode_attention", "rope_kv_write", "rms_norm", "silu_mul", "quick_gelu"):
        monkeypatch.setattr(K, name, lambda *a, _n=name, **k: called.append(_n))
    inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch(hf.config).items()}
    assert torch.equal(auto.generate(**inputs, max_new_tokens=3), sdpa.generate(**inputs, max_new_tokens=3))
    assert called == []  # CPU tensors: no kernel was asked for
    if torch.cuda.is_available():
        monkeypatch.undo()
        auto.to("cuda")
        assert auto.language_model.model.layers[0].self_attn.attn_fn(
            *(torch.randn(1, 4, 3, 16, device="cuda"),) * 3, causal=True).is_cuda


class _SaysCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda=True: auto's choice can be checked without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_auto_attention_runs_the_kernels_on_cuda_unless_a_gradient_flows(monkeypatch):
    """"auto" trains through SDPA (our flash backward is 0.45-0.48x SDPA's): the Triton kernels
    only where the tensors are on CUDA and autograd wants no gradient through them."""
    from llava_next import attention

    called = []
    monkeypatch.setattr(attention, "triton_attention", lambda *a, **k: called.append("triton"))
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a, **k: called.append("sdpa"))

    def choice(*, cuda=True, grad=(False, False, False), enabled=True):
        qkv = [torch.zeros(1, 2, 3, 4, requires_grad=g) for g in grad]
        if cuda:
            qkv = [t.as_subclass(_SaysCuda) for t in qkv]
        with torch.set_grad_enabled(enabled):
            attention.auto_attention(*qkv, causal=True)
        return called.pop()

    assert choice() == "triton"
    assert choice(cuda=False) == "sdpa"
    for grad in ((True, False, False), (False, True, False), (False, False, True)):
        assert choice(grad=grad) == "sdpa"
        assert choice(grad=grad, enabled=False) == "triton"  # under no_grad: inference


def test_triton_mlp_kernels_step_aside_for_any_input_needing_grad(models):
    """With gate_proj frozen and up_proj trainable the SiLU-mul kernel (no backward) must not run;
    nor quick_gelu with only the vision tower's fc1 trainable (fc2 frozen)."""
    config, sdpa, triton = models
    inputs = batch(config)
    # Supervise only the last tokens: the outputs at pad positions (and so the prediction of the
    # first real token from the last pad) are undefined and differ between implementations.
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    trained = ("language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    grads = []
    for model in (sdpa, triton):
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        model(**inputs, labels=labels).loss.backward()
        params = dict(model.named_parameters())
        grads.append([params[name].grad for name in trained])
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(True)
            p.grad = None
    for name, want, got in zip(trained, *grads):
        assert got is not None, name
        rel = ((got - want).norm() / want.norm()).item()
        print(f"{name} grad, the other weight of its MLP frozen, triton vs sdpa: relative error {rel:.2e}")
        assert rel <= 1e-3, name


def test_decode_kernels_short_text_prompt(models):
    """A short left-padded text prompt (2 x 6 rows <= 64): with decode kernels the prefill too runs
    decode_forward (through the cache-writing rope kernel and flash attention, T > 1), then the
    steps take rope_decode_attention; the same greedy tokens as sdpa."""
    config, sdpa, triton = models
    ids, mask = prompt_ids(config, [[], []], [5, 3])
    inputs = dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    assert ids.numel() <= 64
    want = sdpa.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    model = copy.deepcopy(triton).enable_decode_kernels()
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[]), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("decode_kernels,pdl", [(False, False), (True, False), (True, True), (None, False)],
                         ids=["cublas", "decode_kernels", "decode_kernels_pdl", "auto"])
def test_cuda_graph_decode_equals_eager_decode(models, decode_kernels, pdl, monkeypatch):
    """pdl: the graph (and an eager run) with programmatic dependent launch against ordinary launches.
    generate()'s default on CUDA is the graph."""
    import sys

    from llava_next import generation
    from llava_next.generation import GraphedDecode

    config, _, triton = models
    triton = copy.deepcopy(triton).fuse_projections().enable_decode_kernels(decode_kernels)
    inputs = batch(config)
    kw = dict(max_new_tokens=8, eos_token_id=[])
    want = triton.generate(**inputs, **kw, cuda_graph=False)
    monkeypatch.setattr(sys.modules["llava_next.kernels.pdl"], "USE_PDL", pdl)
    assert torch.equal(triton.generate(**inputs, **kw, cuda_graph=False), want)
    assert torch.equal(triton.generate(**inputs, **kw, cuda_graph=True), want)
    captures = []

    class Counted(GraphedDecode):  # a subclass: generate() asks isinstance(cuda_graph, GraphedDecode)
        def __init__(self, *a, **k):
            captures.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(generation, "GraphedDecode", Counted)
    assert torch.equal(triton.generate(**inputs, **kw), want) and captures == [1]  # the default
    handle = triton.language_model.model.norm.register_forward_hook(lambda *a: None)
    assert torch.equal(triton.generate(**inputs, **kw), want) and captures == [1]  # a hook: eager
    handle.remove()
    monkeypatch.setattr(generation, "GraphedDecode", GraphedDecode)
    graph = GraphedDecode(triton, 2, inputs["input_ids"].shape[1] + 16)
    for _ in range(2):  # captured once, replayed over calls
        assert torch.equal(triton.generate(**inputs, **kw, cuda_graph=graph), want)
    triton.enable_decode_kernels(not decode_kernels)  # moves no weight, but the graph holds the old path
    with pytest.raises(ValueError, match="enable_decode_kernels"):
        triton.generate(**inputs, **kw, cuda_graph=graph)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_generate_keeps_every_steps_logits(models):
    """A replay overwrites one logits buffer: output_logits / output_scores must keep a copy per
    step. With num_return_sequences the graph decodes the copied prompt cache as eager steps do."""
    config, _, triton = models
    triton = copy.deepcopy(triton)
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1, num_return_sequences=2,
              return_dict_in_generate=True, output_logits=True, output_scores=True)
    want = triton.generate(**batch(config), **kw, cuda_graph=False)
    got = triton.generate(**batch(config), **kw, cuda_graph=True)
    assert torch.equal(got.sequences, want.sequences) and got.sequences.shape[0] == 4
    assert not torch.equal(got.logits[1], got.logits[2])  # not one buffer seen six times
    for name in ("logits", "scores"):
        for g, w in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_beam_search_reorders_the_graphs_cache(models):
    """Beam search reorders the KV cache rows in place between replays: the graph reads the
    reordered buffers, so its beams equal eager decoding's."""
    config, _, triton = models
    triton = copy.deepcopy(triton)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=[],
              return_dict_in_generate=True, output_scores=True)
    want = triton.generate(**batch(config), **kw, cuda_graph=False)
    got = triton.generate(**batch(config), **kw, cuda_graph=True)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.beam_indices, want.beam_indices)
    assert (got.beam_indices[:, 1:] != got.beam_indices[:, :1]).any()  # beams were reordered
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-4, atol=1e-4)
    from llava_next.generation import GraphedDecode

    inputs = batch(config)
    graph = GraphedDecode(triton, 2 * 3, inputs["input_ids"].shape[1] + 8)  # the caller's: batch * num_beams rows
    for _ in range(2):  # reused: its cache is reset and reordered again
        again = triton.generate(**inputs, **kw, cuda_graph=graph)
        assert torch.equal(again.sequences, want.sequences)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate() captures a CUDA graph by default on CUDA only")
def test_generate_decodes_eagerly_when_its_default_capture_fails(models, monkeypatch):
    from llava_next import generation

    config, _, triton = models
    inputs = batch(config)
    kw = dict(max_new_tokens=6, eos_token_id=[])
    want = triton.generate(**inputs, **kw, cuda_graph=False)

    class Failing(generation.GraphedDecode):  # a subclass: generate() asks isinstance(cuda_graph, GraphedDecode)
        def __init__(self, *a, **k):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "GraphedDecode", Failing)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        assert torch.equal(triton.generate(**inputs, **kw), want)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        triton.generate(**inputs, **kw, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_vision_cuda_graphs_replay_equals_eager(models):
    """enable_vision_cuda_graphs(): the tower's no-grad forward replays a graph per tile count,
    equal to the eager forward; captured again after the weights move or a module is swapped;
    least recently used shapes dropped; eager under hooks and with gradients; and generate()
    gives the same tokens with it."""
    config, _, triton = models
    model = copy.deepcopy(triton)
    tower = model.vision_tower
    inputs = batch(config)
    five, three = inputs["pixel_values"][0], inputs["pixel_values"][1][:3]
    with torch.no_grad():
        want5, want3 = tower(five), tower(three)
        graphs = model.enable_vision_cuda_graphs(max_graphs=2).vision_tower.cuda_graphs
        for _ in range(2):
            torch.testing.assert_close(tower(five), want5, atol=0, rtol=0)
        assert graphs.captures == 1  # captured once, then replayed
        torch.testing.assert_close(tower(three), want3, atol=0, rtol=0)
        torch.testing.assert_close(tower(five[:1]), tower.vision_model(five[:1]), atol=0, rtol=0)
        assert graphs.captures == 3 and len(graphs.graphs) == 2  # the five-tile graph was the least recent
        model.fuse_projections()  # moves the q/k/v weights: every graph is stale
        torch.testing.assert_close(tower(three), want3, atol=1e-5, rtol=1e-5)  # fused: rounds differently
        assert graphs.captures == 4 and len(graphs.graphs) == 1
        got = []
        for stream in (torch.cuda.Stream(), torch.cuda.Stream()):  # two callers' streams, one graph
            with torch.cuda.stream(stream):
                got.append(tower(three))
        torch.cuda.synchronize()
        for out in got:
            torch.testing.assert_close(out, want3, atol=1e-5, rtol=1e-5)
        layer = tower.vision_model.encoder.layers[0]
        handle = layer.register_forward_hook(lambda *a: None)  # a replay would skip it: eager
        tower(three)
        handle.remove()
        assert graphs.captures == 4
    out = tower(three)  # with gradients: eager, and they flow
    assert graphs.captures == 4 and out.requires_grad
    kw = dict(max_new_tokens=4, eos_token_id=[])
    with_graphs = model.generate(**inputs, **kw)
    assert graphs.captures == 5  # the batch's tiles, a new shape: generate()'s prefill went through a graph
    with torch.inference_mode():  # captured under inference_mode, replayed under no_grad after
        model.enable_vision_cuda_graphs()
        torch.testing.assert_close(model.vision_tower(three), want3, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_tower(three), want3, atol=1e-5, rtol=1e-5)
    assert model.vision_tower.cuda_graphs.captures == 1
    assert torch.equal(with_graphs, model.enable_vision_cuda_graphs(False).generate(**inputs, **kw))


def test_runs_python_per_call_sees_hooks_and_replaced_forwards(models):
    """What keeps generate() from capturing a CUDA graph by default: Python that a replay would skip."""
    from llava_next.language import runs_python_per_call

    _, _, triton = models
    model = copy.deepcopy(triton)
    assert not runs_python_per_call(model.modules())
    mlp = model.language_model.model.layers[0].mlp
    for register in (mlp.register_forward_hook, mlp.register_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *a: None)
        assert runs_python_per_call(model.modules())
        handle.remove()
    assert not runs_python_per_call(model.modules())
    model.enable_input_require_grads()  # PEFT calls it; its hook does nothing under no_grad
    assert not runs_python_per_call(model.modules())
    mlp.forward = lambda x: x
    assert runs_python_per_call(model.modules())


def test_graphed_or_eager_falls_back_after_a_failed_capture(models, monkeypatch):
    """generate()'s default capture (after the first token, on the prefilled cache): a failure
    warns and gives eager steps on the same cache, with the scratch slot cleared again; a capture
    asked for (required) raises."""
    from llava_next import generation

    config, sdpa, triton = models
    # The fallback does not depend on the attention: on CPU the sdpa model saves the interpreter's
    # two prefills (~30 s); on CUDA the triton model's eager steps are the ones generate() falls back to.
    triton = triton if DEVICE == "cuda" else sdpa
    inputs = batch(config)
    B, T = inputs["input_ids"].shape
    cache = KVCache.for_model(triton, B, T + 4)

    def fail(*a, cache, **k):
        cache.kv_mask[:, -1] = True  # as if a warm-up step had run on the scratch slot
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "GraphedDecode", fail)
    with pytest.raises(RuntimeError, match="capturing"):
        generation.graphed_or_eager(triton, B, T + 4, True, cache, required=True)
    args = [inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")]
    generation.prefill(triton, *args, cache)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="decoding eagerly"):
            step = generation.graphed_or_eager(triton, B, T + 4, True, cache, required=False)
        assert not cache.kv_mask[:, -1].any()
        token = torch.tensor([[5], [7]], device=DEVICE)
        got = step(token, torch.tensor(T, device=DEVICE))
        other = KVCache.for_model(triton, B, T + 4)
        generation.prefill(triton, *args, other)
        want = generation.decode_one_token(triton, token, other, torch.tensor(T, device=DEVICE))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_forward_with_biases_equals_forward(dtype):
    """decode_forward against forward on a decoder with q/k/v/o and MLP biases (the tiny
    checkpoints have none), a few rows, no cache: only the products and their fusions differ."""
    from llava_next.attention import triton_attention
    from llava_next.config import TextConfig
    from llava_next.fused_linear import fuse_linears
    from llava_next.language import LlamaModel

    cfg = TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaModel(cfg, triton_attention, kernels="triton").to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5))
    model = model.to(dtype)
    for layer in model.layers:
        fuse_linears((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
        fuse_linears((layer.mlp.gate_proj, layer.mlp.up_proj))
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=dtype)
    pos = torch.arange(3, device=DEVICE)[None].expand(2, 3)
    with torch.no_grad():
        want = model(x, pos)
        for layer in model.layers:
            layer.decode_kernels = True
        assert model.layers[0]._decode_weights(x) is not None
        got = model(x, pos)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_decode_refuses_moved_weights(models):
    """A graph reads the weights' exact buffers: generate must not fuse under it, and weights
    moved since the capture are refused rather than read from freed memory."""
    from llava_next.generation import GraphedDecode

    config, _, triton = models
    model = copy.deepcopy(triton).to(torch.float64).float()  # fresh storage: nothing fused
    inputs = batch(config)
    kw = dict(max_new_tokens=4, eos_token_id=[])
    want = model.generate(**inputs, **kw, fuse_projections=False)
    graph = GraphedDecode(model, 2, inputs["input_ids"].shape[1] + 8, fuse_projections=False)
    assert torch.equal(model.generate(**inputs, **kw, cuda_graph=graph), want)  # default fuse: skipped
    model.fuse_projections()
    with pytest.raises(ValueError, match="weights moved since this GraphedDecode was captured"):
        model.generate(**inputs, **kw, cuda_graph=graph)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate fuses the projections on CUDA only")
def test_generate_fuses_projections_on_cuda_unless_told_not(models):
    config, _, triton = models
    model = copy.deepcopy(triton).to(torch.float64).float()  # fresh storage: nothing fused
    attn = model.language_model.model.layers[0].self_attn
    shared = lambda: attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()  # noqa: E731
    inputs = batch(config)
    want = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], fuse_projections=False)
    assert not shared()
    got = model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
    assert shared() and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 on a GPU only")
def test_bf16_triton_close_to_sdpa(tmp_path):
    hf = hf_checkpoint(tmp_path, "mistral", **SMALL)
    load = lambda attn: LlavaNextForConditionalGeneration.from_pretrained(  # noqa: E731
        tmp_path, attn_implementation=attn, device_map="cuda", torch_dtype=torch.bfloat16)
    inputs = batch(hf.config)
    with torch.no_grad():
        want = load("sdpa")(**inputs).logits.float()
        got = load("triton")(**inputs).logits.float()
    real = inputs["attention_mask"].bool()
    rel = (got - want)[real].norm() / want[real].norm()
    print(f"bf16 logits, triton vs sdpa: relative error {rel:.2e}")
    assert rel < 2e-2
