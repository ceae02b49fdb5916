"""CLIP ViT vision tower. Module names equal the checkpoint keys under `vision_tower.vision_model.`.

Only the layers up to the deepest `vision_feature_layer` are run: LLaVA reads the penultimate
layer. The later layers and `post_layernorm` are still built and loaded (frozen, they can get no
gradient) so that a loaded checkpoint saves back whole.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import small_kernels_apply
from .config import VisionConfig
from .fused_linear import run_linears
from .language import _autocast, run_layer, runs_python_per_call


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2 + 1, cfg.hidden_size)
        self.image_size = cfg.image_size

    def forward(self, pixel_values):  # (N, 3, S, S)
        N, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"vision tower expects {self.image_size}x{self.image_size} tiles, got {H}x{W}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, p, p)
        x = x.flatten(2).transpose(1, 2)  # (N, p*p, C)
        cls = self.class_embedding.expand(N, 1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + p*p, C)
        return x + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, attn_fn):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.attn_fn = attn_fn

    def forward(self, x):  # (N, T, C)
        N, T, C = x.shape
        q, k, v = run_linears(x, (self.q_proj, self.k_proj, self.v_proj))  # one product after fuse_projections()
        q = q.view(N, T, self.num_heads, self.head_dim).transpose(1, 2)  # (N, nh, T, hd)
        k = k.view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
        y = self.attn_fn(q, k, v, causal=False)  # (N, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(N, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, kernels: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.kernels = kernels

    def forward(self, x):
        h = self.fc1(x)
        # quick_gelu, as CLIP was trained: one kernel pass instead of eager's three (no backward:
        # it steps aside when h needs a gradient)
        if small_kernels_apply(self.kernels, h):
            from .kernels import quick_gelu
            return self.fc2(quick_gelu(h))
        return self.fc2(h * torch.sigmoid(1.702 * h))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, attn_fn, kernels: str = "none"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, attn_fn)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg, kernels)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, attn_fn, kernels: str = "none"):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, attn_fn, kernels) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    """Returns the hidden states LLaVA selects, concatenated on channels: (N, 1 + p*p, C * len(layers))."""

    def __init__(self, cfg: VisionConfig, feature_layers: list[int], attn_fn, kernels: str = "none"):
        super().__init__()
        n = cfg.num_hidden_layers
        # hidden_states[0] is the embeddings after pre_layrnorm, hidden_states[i] the output of layer i.
        self.feature_layers = [layer if layer >= 0 else n + 1 + layer for layer in feature_layers]
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's key
        self.encoder = CLIPEncoder(cfg, attn_fn, kernels)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # never run
        self.num_layers_run = max(self.feature_layers)
        for module in [*self.encoder.layers[self.num_layers_run:], self.post_layernorm]:
            module.requires_grad_(False)
        self.gradient_checkpointing = False  # or a language.Checkpointing

    def forward(self, pixel_values):  # (N, 3, S, S)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        selected = {0: x} if 0 in self.feature_layers else {}
        for i, layer in enumerate(self.encoder.layers[: self.num_layers_run], start=1):
            x = run_layer(self, i - 1, layer, x)
            if i in self.feature_layers:
                selected[i] = x
        return torch.cat([selected[i] for i in self.feature_layers], dim=-1)


class CLIPVisionModel(nn.Module):
    """Wrapper for the `vision_model.` level of the hub key names, and the seam where the
    tower's no-gradient CUDA forwards may replay from CUDA graphs (`cuda_graphs`, set by
    LlavaNextForConditionalGeneration.enable_vision_cuda_graphs)."""

    def __init__(self, cfg: VisionConfig, feature_layers: list[int], attn_fn, kernels: str = "none"):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, feature_layers, attn_fn, kernels)
        self.cuda_graphs = None  # a VisionTowerGraphs, or None: always eager

    def forward(self, pixel_values):
        graphs = self.cuda_graphs
        if graphs is not None and graphs.applies(self.vision_model, pixel_values):
            return graphs(self.vision_model, pixel_values)
        return self.vision_model(pixel_values)


class VisionTowerGraphs:
    """The vision tower's forward captured as a CUDA graph per input shape and replayed.

    Why: one image is five 336 px tiles, and the tower runs ~300 short kernels over them (5.3 ms
    of kernels on an H100), but its eager forward took 8.6-12.9 ms there: the CPU launching the
    kernels one by one is slower than the GPU running them (bench/NOTES.md, sixth and seventh
    sessions). A replay is one launch. It runs only where replaying is the same as calling: CUDA
    tensors, no gradient, no autocast or torch.compile, no hooks or replaced forwards in the tower;
    and only up to `max_tiles` tiles a call: past about ten the GPU's work outlasts the launching
    (~1 ms of kernels a tile), so a graph would save nothing and hold more memory.

    A graph reads the weights and runs the modules it was captured with: all graphs are dropped
    and captured again when a weight moved (.to(), fuse_projections(), load_state_dict(assign=
    True)) or a module was swapped (a PEFT wrapper). Python-side switches inside a module (an
    adapter turned off) are not seen: enable_vision_cuda_graphs() again after such a change.
    Each graph keeps its activations' memory (~100 MB for five tiles at ViT-L); at most
    `max_graphs` shapes are kept, the least recently used dropped first.
    The static buffers are shared by all callers: calls take turns on the host (a lock), and the
    copy-in, replay and copy-out all run on one stream of this object's own, which waits for the
    caller's stream and which the caller's stream waits for; so replays are ordered on the GPU
    whichever streams the callers use, and the graphs' memory is only ever reused in that order."""

    def __init__(self, max_graphs: int = 4, max_tiles: int = 16):
        if max_graphs < 1 or max_tiles < 1:
            raise ValueError(f"max_graphs and max_tiles must be >= 1, got {max_graphs} and {max_tiles}")
        self.max_graphs, self.max_tiles = max_graphs, max_tiles
        self.graphs = collections.OrderedDict()  # (shape, dtype, device) -> (graph, static input, static output)
        self.signature = None  # the modules and weight addresses the graphs were captured with
        self.captures = 0
        self.lock = threading.Lock()  # the static buffers are shared: one copy-replay-clone at a time
        self.streams = {}  # device -> the stream every capture and replay on it runs on

    def __reduce__(self):  # deepcopy / pickle of the model: a copy captures its own graphs
        return type(self), (self.max_graphs, self.max_tiles)

    def applies(self, tower, pixel_values) -> bool:
        return len(pixel_values) <= self.max_tiles and self.replay_is_call(tower, pixel_values)

    @staticmethod
    def replay_is_call(tower, pixel_values) -> bool:
        return (pixel_values.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing()  # inside a caller's own graph: be part of it
                and not _autocast(pixel_values) and not runs_python_per_call(tower.modules()))

    def __call__(self, tower, pixel_values):
        with self.lock, self.own_stream(pixel_values.device) as caller:
            signature = ([id(m) for m in tower.modules()], [p.data_ptr() for p in tower.parameters()])
            if signature != self.signature:
                self.graphs.clear()
                self.signature = signature
            key = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
            if key in self.graphs:
                self.graphs.move_to_end(key)
            else:
                if len(self.graphs) >= self.max_graphs:  # evict before capturing: one pool fewer at the peak
                    self.graphs.popitem(last=False)
                self.graphs[key] = self._capture(tower, pixel_values)
            graph, static_in, static_out = self.graphs[key]
            static_in.copy_(pixel_values)
            graph.replay()
            out = static_out.clone()  # the next replay overwrites static_out
            if out.is_cuda:  # made on our stream, used on the caller's: not reused before that is done
                out.record_stream(caller)
            return out

    @contextlib.contextmanager
    def own_stream(self, device):
        """Run the block on this object's stream for `device`, after the caller's stream's work,
        and make the caller's stream (which it yields) wait for it, also when the block fails."""
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            if device not in self.streams:
                self.streams[device] = torch.cuda.Stream(device)
            own = self.streams[device]
            own.wait_stream(caller)
            try:
                with torch.cuda.stream(own):
                    yield caller
            finally:
                caller.wait_stream(own)

    def _capture(self, tower, pixel_values):
        """(graph, static input, static output), on the current stream (own_stream's). Normal
        tensors even when called under inference_mode (own_stream leaves it): the static input
        is written in place by later calls, which inference tensors refuse outside it."""
        static_in = torch.empty_like(pixel_values, memory_format=torch.contiguous_format).copy_(pixel_values)
        tower(static_in)  # compiles the Triton kernels and settles the allocator before capture
        graph = torch.cuda.CUDAGraph()
        # On this stream, not torch.cuda.graph's own default one (one per process, made on
        # whichever device was current first); thread_local lets other threads use CUDA meanwhile.
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
            static_out = tower(static_in)
        self.captures += 1
        return graph, static_in, static_out


class LlavaNextMultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact (erf) GELU
