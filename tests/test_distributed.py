"""Conversion before shard, with two processes over gloo (CPU, torchao emulate=True)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
pytest.importorskip("torchao")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from mla_compiler.models import TinyMLAModel, nam56r_small

    torch.manual_seed(0)
    cfg = nam56r_small(n_layers=2)
    return cfg, TinyMLAModel(cfg)


def _batch(cfg):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (2, 33), generator=g)


def _train(model, step_fn, tokens, steps=STEPS):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        logits = step_fn(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world, port, order, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import mla_compiler
        from mla_compiler.distributed import check_shard_order, prepare_fp8_fsdp
        from torch._dynamo.utils import counters
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        mesh = init_device_mesh("cpu", (world,))
        cfg, model = _model()
        config = Float8LinearConfig(emulate=True)
        result = {}
        if order == "recipe":
            # The README's recipe, as written: meta-device init, convert, shard, materialize, compile.
            from mla_compiler.models import TinyMLAModel

            with torch.device("meta"):
                model = TinyMLAModel(cfg)
            prepare_fp8_fsdp(model, mesh, float8_config=Float8LinearConfig(emulate=True))
            model.to_empty(device="cpu")
            torch.manual_seed(0)
            model.init_weights()
            compiled = torch.compile(model, backend="sparse_mla")
            result["losses"] = _train(model, compiled, _batch(cfg))
            result["matched"] = counters["sparse_mla"]["matched"]
        elif order == "right":
            prepare_fp8_fsdp(model, mesh, float8_config=config)
            compiled = torch.compile(model, backend=mla_compiler.make_backend(inner="aot_eager"))
            ops = __import__("mla_compiler.lowering.ops", fromlist=["kernel_for"])
            calls, kernel_for = [], ops.kernel_for
            ops.kernel_for = lambda problem: calls.append(problem) or kernel_for(problem)
            result["losses"] = _train(model, compiled, _batch(cfg))
            result["matched"] = counters["sparse_mla"]["matched"]
            result["op_calls"] = len(calls)
            result["fp8_modules"] = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        else:
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            convert_to_float8_training(model, config=config, module_filter_fn=mla_compiler.distributed.default_filter)
            for name, call in (("check", lambda: check_shard_order(model)), ("compile", lambda: torch.compile(model, backend="sparse_mla")(_batch(cfg)[:, :-1]))):
                try:
                    call()
                    result[name] = "no error"
                except Exception as exc:  # noqa: BLE001 - the test reads what was raised
                    result[name] = f"{type(exc).__name__}: {exc}"
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(order, tmp_path):
    out = tmp_path / f"{order}.json"
    mp.spawn(_worker, args=(2, _free_port(), order, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_right_order_trains_and_tracks_single_process(tmp_path):
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    import mla_compiler

    result = _spawn("right", tmp_path)
    cfg, model = _model()
    convert_to_float8_training(model, config=Float8LinearConfig(emulate=True), module_filter_fn=mla_compiler.distributed.default_filter)
    single = _train(model, model, _batch(cfg))
    # FSDP hooks split the graph per block; both blocks share one compiled Block graph (one site),
    # and every layer runs the op forward and backward at every step.
    assert result["fp8_modules"] > 0 and result["matched"] >= 1
    assert result["op_calls"] == 2 * cfg.n_layers * STEPS
    assert result["losses"][-1] < result["losses"][0]
    for dist_loss, ref_loss in zip(result["losses"], single):
        assert abs(dist_loss - ref_loss) < 1e-3 * abs(ref_loss)  # same data on both ranks: FSDP averages equal grads


def test_reversed_order_raises_shard_order_error_not_the_dtensor_crash(tmp_path):
    result = _spawn("reversed", tmp_path)
    for where in ("check", "compile"):
        assert result[where].startswith("ShardOrderError"), result[where]
        assert "convert_to_float8_training" in result[where] and "fully_shard" in result[where]
        assert "mixed torch.Tensor and DTensor" not in result[where]


def test_check_is_silent_without_fsdp_or_fp8():
    from mla_compiler.distributed import check_shard_order

    _, model = _model()
    check_shard_order(model)  # no FSDP, no FP8: nothing to say


@pytest.mark.inductor
def test_readme_recipe_trains(tmp_path):
    result = _spawn("recipe", tmp_path)
    assert result["matched"] >= 1 and result["losses"][-1] < result["losses"][0]
