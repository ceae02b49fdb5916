"""DistributedDataParallel (and FSDP2) on CPU (gloo, 2 processes): the model is a plain nn.Module
with no global state, and the parameters it never runs (vision layers past the feature layer, post_layernorm)
are frozen by construction, so DDP needs no find_unused_parameters."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llava_next import LlavaNextConfig, LlavaNextForConditionalGeneration
from tiny import image_inputs, prompt_ids

WORLD = 2
STEPS = 4
CONFIG = {
    "image_token_index": 1050, "image_grid_pinpoints": [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
    "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=56, patch_size=14),
    "text_config": dict(model_type="mistral", vocab_size=1100, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
}


def batch(config, seed):
    """A left-padded batch with an image per row, different on each rank; the last 4 tokens supervised."""
    sizes = [(45, 80), (150, 40)]
    ids, mask = prompt_ids(config, [[s] for s in sizes], [3, 9], seed=seed)
    pv, image_sizes = image_inputs(config, sizes, seed=seed)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-4] = -100
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=image_sizes, labels=labels)


def wrap(model, mode):
    if mode == "fsdp":  # FSDP2: each layer its own shard unit, then the rest
        from torch.distributed.fsdp import fully_shard

        for layer in [*model.vision_tower.vision_model.encoder.layers, *model.language_model.model.layers]:
            fully_shard(layer)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False


def train(rank, init_file, out_dir, modes):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for mode in modes:
            # DDP must broadcast rank 0's initial weights (so each rank starts from its own);
            # FSDP shards what it is given, so every rank builds rank 0's.
            torch.manual_seed(0 if mode == "fsdp" else rank)
            model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(CONFIG)).train()
            if mode != "ddp":
                model.gradient_checkpointing_enable()
            wrapped = wrap(model, mode)
            optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
            inputs = batch(model.config, seed=rank)
            losses = []
            for _ in range(STEPS):
                loss = wrapped(**inputs).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            state = model.state_dict()
            if mode == "fsdp":  # gather the shards (DTensors) into full tensors
                state = {k: v.full_tensor() for k, v in state.items()}
            flat = torch.cat([state[k].detach().flatten() for k in sorted(state)])
            every = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(every, flat)
            identical = all(torch.equal(every[0], other) for other in every[1:])
            results[mode] = {"losses": losses, "identical": identical, "params": flat}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done with gloo before either tears it down (a rank destroying the group while
        # the other's gloo threads still work aborted once: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_gloo_two_processes(tmp_path):
    """A few steps on each of 2 ranks (different data, the same init): DDP, DDP with gradient
    checkpointing and FSDP2 with it all train the same weights, identical on both ranks."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
        modes = ["ddp", "ddp+checkpointing", "fsdp"]
    except ImportError:
        modes = ["ddp", "ddp+checkpointing"]
    mp.spawn(train, args=(str(tmp_path / "init"), str(tmp_path), modes), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode, result in results.items():
            losses = result["losses"]
            print(f"rank {rank}, {mode}: losses {[round(x, 4) for x in losses]}")
            assert result["identical"], f"{mode}: parameters differ across ranks after training"
            assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], mode
        for mode in modes[1:]:
            torch.testing.assert_close(results[mode]["losses"], results["ddp"]["losses"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(results[mode]["params"], results["ddp"]["params"], rtol=1e-4, atol=1e-6)
