"""DDP over a compiled model and FSDP2 over compiled blocks: two processes, gloo, CPU."""
import pathlib
import subprocess
import sys
import textwrap

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, {tests!r})
    import fxcompress
    from conftest import make_model
    from test_quant import _no_dropout
    from torch.distributed.fsdp import fully_shard

    def fsdp2(model, compress):
        # the README's recipe: compress each block, shard each block, then shard the root
        for name, child in list(model.named_children()):
            if any(True for _ in child.parameters()):
                if compress:
                    child = fxcompress.compile(child, fxcompress.CompressConfig(codec=compress), backend="eager")
                    setattr(model, name, child)
                fully_shard(child)
        return fully_shard(model)

    def worker(rank, world, out, port):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        grads = {{}}
        for name in ("mlp", "convnet"):
            for label in ("ddp", "ddp+fxcompress"):
                torch._dynamo.reset()
                model, x = make_model(name)
                _no_dropout(model)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                run = ddp if label == "ddp" else fxcompress.compile(
                    ddp, fxcompress.CompressConfig(codec="lossless"), backend="eager")
                run(x.chunk(world)[rank]).pow(2).mean().backward()
                grads[name, label] = {{n: p.grad.clone() for n, p in model.named_parameters()}}
                if label != "ddp":
                    grads[name, "captured"] = len(run.capture_log.captures())
            for label in ("fsdp2", "fsdp2+lossless", "fsdp2+int4"):
                torch._dynamo.reset()
                torch.manual_seed(0)
                model, x = make_model(name)
                _no_dropout(model)
                fsdp2(model, label.partition("+")[2])
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                for step in range(2):  # the second step runs on re-gathered, updated parameters
                    opt.zero_grad()
                    model(x.chunk(world)[rank]).pow(2).mean().backward()
                    opt.step()
                grads[name, label] = [p.grad.full_tensor() for p in model.parameters()]
        if rank == 0:
            torch.save(grads, out)
        # NB: both ranks done with gloo before either tears it down. Once (1 of 3 CI runs on 2026-12-01)
        # rank 1 aborted at the end ("terminate called without an active exception") while rank 0 saved;
        # the cause is not established, and the barrier is the cheap guard against the likeliest one
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2)
    """
)


def test_ddp_two_processes_match_ddp_and_single_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests")))
    out = tmp_path / "grads.pt"
    done = subprocess.run([sys.executable, str(script), str(out), str(port)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    grads = torch.load(out)
    for name in ("mlp", "convnet"):
        assert grads[name, "captured"] >= 1
        for k, g in grads[name, "ddp"].items():  # lossless: bit-identical to DDP without fxcompress
            assert torch.equal(grads[name, "ddp+fxcompress"][k], g), (name, k)

        for label in ("fsdp2+lossless", "fsdp2+int4"):
            assert len(grads[name, label]) == len(grads[name, "fsdp2"]) > 0
        for g, ref in zip(grads[name, "fsdp2+lossless"], grads[name, "fsdp2"]):
            assert torch.equal(g, ref), name
        flat = [torch.cat([g.flatten() for g in grads[name, k]]) for k in ("fsdp2+int4", "fsdp2")]
        assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99, name

    # and equal to one process on the global batch (the MLP has no per-shard statistics)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model
    from test_quant import _no_dropout

    model, x = make_model("mlp")
    _no_dropout(model)
    model(x).pow(2).mean().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads["mlp", "ddp+fxcompress"][k], p.grad, rtol=1e-5, atol=1e-7)
