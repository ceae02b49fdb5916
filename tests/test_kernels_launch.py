"""Every kernel launches on its tensors' GPU, not on whichever one is current (kernels/launch.py)."""

import pytest
import torch

pytest.importorskip("triton")

import llava_next.kernels as K  # noqa: E402
from llava_next.kernels.launch import on_tensor_device  # noqa: E402

LAUNCHERS = [n for n in K.__all__ if n != "triton_available" and not n.endswith("_reference")]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_public_launcher_makes_its_tensors_device_current(name):
    fn = getattr(K, name)
    assert fn.__code__ is on_tensor_device(abs).__code__, f"{name} is not wrapped in on_tensor_device"


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on cuda:<index>: the device switch is checked without a GPU."""

    index = 1

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", self.index)


def test_on_tensor_device_switches_only_to_another_gpu(monkeypatch):
    entered = []

    class Switch:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("back")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    seen = []
    launch = on_tensor_device(lambda x, y, *, z: seen.append((list(entered), y, z)) or "out")

    x = torch.zeros(2).as_subclass(_OnGpu)
    assert launch(x, 1, z=2) == "out"
    assert seen.pop() == ([torch.device("cuda", 1)], 1, 2) and entered == [torch.device("cuda", 1), "back"]
    entered.clear()
    assert launch(y=1, z=2, x=x) == "out"  # the tensor passed by name
    assert seen.pop() == ([torch.device("cuda", 1)], 1, 2) and entered == [torch.device("cuda", 1), "back"]
    entered.clear()
    _OnGpu.index = 0  # already the current device: no switch
    try:
        assert launch(x, 1, z=2) == "out" and seen.pop() == ([], 1, 2) and entered == []
    finally:
        _OnGpu.index = 1
    assert launch(torch.zeros(2), 3, z=4) == "out" and seen.pop() == ([], 3, 4)  # CPU: nothing to switch


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_and_decode_graph_on_the_second_gpu(tmp_path):
    """With cuda:0 current, a model on cuda:1 runs its kernels and captures its decode graph on
    cuda:1, and generates what the same model does on cuda:0."""
    from tiny import hf_checkpoint, image_inputs, prompt_ids

    from llava_next import LlavaNextForConditionalGeneration

    small = dict(image_size=56, patch_size=14, pinpoints=[[56, 112], [112, 56], [112, 112]])
    hf = hf_checkpoint(tmp_path, "mistral", **small)
    ids, mask = prompt_ids(hf.config, [[(56, 112)]], [9])
    pixel_values, image_sizes = image_inputs(hf.config, [(56, 112)])
    torch.cuda.set_device(0)
    outs = []
    for device in ("cuda:0", "cuda:1"):
        model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16,
                                                                  attn_implementation="triton").to(device)
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outs.append(model.generate(**inputs, max_new_tokens=12, cuda_graph=True).cpu())
        assert torch.cuda.current_device() == 0
    assert torch.equal(outs[0], outs[1])
