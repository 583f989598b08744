"""Check that everything the project runs on a CUDA GPU agrees with its CPU twin (`make test-gpu`).

    .venv/bin/python tools/gpu_check.py

Checks, one PASS/FAIL line each with its numbers (about a minute on one GPU): feature extraction
(random ResNet-18, 256 synthetic images, CUDA against CPU, cosine >= 0.999 per image); faiss flat
search (the same neighbours up to ties) and k-means (objective within 1 %) on the GPU against the CPU;
the core-set CUDA path against the CPU path on float32 and float16 features (the same picks, or the
first differing pick a tie within float rounding and the same covering radius); the herding greedy of
UHerding and MaxHerding (the same objective within 1e-4) and DCoM's radii (the same threshold and
coverage) on CUDA against the CPU; a linear probe trained
with mixed precision (`engine.fit(amp=True)`); and a one-process torchrun on NCCL all-reducing a tensor.
Exit status 1 if any check fails. Without a CUDA device it prints one line and exits 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import torch

import strategies
from lowbudget import datasets, dcom, engine, faiss_ops, herding
from lowbudget.features import extract
from lowbudget.runtime import faiss_uses_gpu, resolve_precision
from models.checkpoints import build_backbone

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
NCCL_SCRIPT = """import torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(0)
t = torch.full((4,), 3.0, device="cuda")
dist.all_reduce(t)
print(f"all_reduce {t.sum().item():.1f}")
dist.destroy_process_group()
"""


def report(name: str, ok: bool, numbers: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {numbers}", flush=True)
    return ok


def clustered(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit float32 rows around 20 random centres, each row's centre): features with structure."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    labels = rng.integers(0, 20, rows)
    feats = centres[labels] + 0.3 * rng.standard_normal((rows, dim)).astype(np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True), labels


def clustered_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    return clustered(rows, dim, seed)[0]


def check_extraction() -> bool:
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", "random")
    rng = np.random.default_rng(0)
    images = datasets.ArrayImages(rng.integers(0, 256, (256, 3, 32, 32), dtype=np.uint8), np.zeros(256))
    precision = resolve_precision("auto", CUDA)
    on_gpu, _ = extract(model, images, "cifar10", 64, 0, CUDA, desc="", precision=precision)
    on_cpu, _ = extract(model.cpu(), images, "cifar10", 64, 0, CPU, desc="")
    cosine = np.einsum("ij,ij->i", on_gpu, on_cpu)
    return report("extraction", bool(cosine.min() >= 0.999),
                  f"256 images, CUDA ({precision}) vs CPU cosine min {cosine.min():.6f} mean {cosine.mean():.6f}")


def check_flat_search() -> bool:
    base, queries = clustered_rows(20000, 128, 1), clustered_rows(500, 128, 2)
    dist_cpu, idx_cpu = faiss_ops.flat_search(base, queries, 10, gpu=False)
    dist_gpu, idx_gpu = faiss_ops.flat_search(base, queries, 10, gpu=True)
    differ = idx_cpu != idx_gpu
    ties = np.abs(dist_cpu - dist_gpu)[differ].max(initial=0.0)
    return report("faiss flat search", bool(ties <= 1e-4),
                  f"{differ.sum()} of {differ.size} neighbours differ, largest distance gap there {ties:.2e}")


def check_kmeans() -> bool:
    feats = clustered_rows(20000, 128, 3)
    objective_cpu = float(faiss_ops.kmeans(feats, 100, gpu=False)[2].sum())
    objective_gpu = float(faiss_ops.kmeans(feats, 100, gpu=True)[2].sum())
    gap = abs(objective_gpu - objective_cpu) / objective_cpu
    return report("faiss k-means", gap <= 0.01,
                  f"objective GPU {objective_gpu:.2f} vs CPU {objective_cpu:.2f} ({gap:.3%} apart)")


def distance_to(feats: np.ndarray, centres: np.ndarray, point: int) -> float:
    """Squared L2 distance (float64) from row `point` to its nearest row among `centres`."""
    x = feats.astype(np.float64)
    return float(((x[centres] - x[point]) ** 2).sum(1).min())


def covering_radius(feats: np.ndarray, centres: np.ndarray) -> float:
    """Largest squared distance (float64) from a row to its nearest of `centres`."""
    x, c = feats.astype(np.float64), feats[centres].astype(np.float64)
    sq_c = (c ** 2).sum(1)
    return max(float(((rows ** 2).sum(1)[:, None] - 2 * rows @ c.T + sq_c).min(1).max())
               for rows in np.array_split(x, max(1, len(x) // 2048)))


def coreset_agrees(feats: np.ndarray, labeled: np.ndarray, picks: int) -> tuple[bool, str]:
    """The CUDA path's picks against the CPU path's: the same, or the first differing pick a tie within
    float rounding and the same covering radius."""
    on_cpu = strategies.coreset_select(feats, labeled, picks, progress=False).indices
    on_gpu = strategies.coreset_select(feats, labeled, picks, device="cuda", progress=False).indices
    if np.array_equal(on_cpu, on_gpu):
        return True, f"the same {picks} picks"
    first = int(np.flatnonzero(on_cpu != on_gpu)[0])
    centres = np.concatenate([labeled, on_cpu[:first]])
    d_cpu, d_gpu = distance_to(feats, centres, on_cpu[first]), distance_to(feats, centres, on_gpu[first])
    r_cpu = covering_radius(feats, np.concatenate([labeled, on_cpu]))
    r_gpu = covering_radius(feats, np.concatenate([labeled, on_gpu]))
    ok = abs(d_cpu - d_gpu) <= 1e-5 * max(d_cpu, 1.0) and abs(r_cpu - r_gpu) <= 1e-5 * max(r_cpu, 1.0)
    return ok, (f"first different pick #{first}: distance CPU {d_cpu:.8f} vs CUDA {d_gpu:.8f}; "
                f"covering radius CPU {r_cpu:.8f} vs CUDA {r_gpu:.8f}")


def check_coreset() -> bool:
    """Enough picks that the CUDA path renews its frontier and reserve many times; float16 storage too."""
    feats, labeled = clustered_rows(20000, 128, 4), np.arange(50)
    verdicts = {dtype: coreset_agrees(feats.astype(dtype), labeled, 1500) for dtype in ("float32", "float16")}
    return report("core-set", all(ok for ok, _ in verdicts.values()),
                  "; ".join(f"{dtype}: {numbers}" for dtype, (_, numbers) in verdicts.items()))


def herding_objective(feats: np.ndarray, chosen: np.ndarray, weights: np.ndarray, bandwidth: float) -> float:
    """sum_j u_j max over the chosen rows of k(x_j, x), in float64: what the herding greedy maximises."""
    x = torch.from_numpy(feats).double()
    sq_dist = torch.cdist(x[torch.from_numpy(chosen)], x).square()
    return float((torch.exp(-sq_dist / bandwidth ** 2).amax(0) * torch.from_numpy(weights)).sum())


def check_herding() -> bool:
    """UHerding's and MaxHerding's lazy greedy on CUDA against the CPU: the same picks, or the same objective
    within float32 rounding where near-ties differ."""
    feats = clustered_rows(8000, 64, 6)
    weights = np.random.default_rng(6).random(len(feats)) + 0.01
    labeled = np.arange(10)
    picks = {device: herding.HerdingGreedy(herding.herding_kernel(feats, 0.5, device), labeled, weights).take(200)
             for device in (CPU, CUDA)}
    same = int(np.argmin(picks[CPU].indices == picks[CUDA].indices)) if not np.array_equal(
        picks[CPU].indices, picks[CUDA].indices) else len(picks[CPU].indices)
    objectives = [herding_objective(feats, np.concatenate([labeled, picks[d].indices]), weights, 0.5)
                  for d in (CPU, CUDA)]
    gap = abs(objectives[0] - objectives[1]) / objectives[0]
    return report("herding greedy", gap <= 1e-4, f"{same} of 200 picks the same before the first difference; "
                  f"objective {objectives[0]:.4f} (CPU) against {objectives[1]:.4f} (CUDA), relative {gap:.1e}")


def check_dcom_radii() -> bool:
    """DCoM's ball radii, sorted on CUDA against the CPU: the same self-consistent threshold and coverage."""
    feats, labels = clustered(20000, 64, 7)
    predictions = np.where(np.random.default_rng(7).random(len(feats)) < 0.6, labels, (labels + 1) % 20)
    labelled = np.arange(0, 20000, 400)  # coverage about 0.87: the threshold is set by the bisection
    radii = {device: dcom.consistent_radii(dcom.labelled_balls(feats, labelled, labels[labelled], predictions,
                                                               device), len(feats)) for device in (CPU, CUDA)}
    gap = float(np.abs(radii[CPU].radii - radii[CUDA].radii).max())
    ok = radii[CPU].threshold == radii[CUDA].threshold and abs(radii[CPU].coverage - radii[CUDA].coverage) <= 1e-3
    return report("dcom radii", ok and gap <= 1e-4, f"threshold {radii[CPU].threshold:.4f} / "
                  f"{radii[CUDA].threshold:.4f}, coverage {radii[CPU].coverage:.4f} / {radii[CUDA].coverage:.4f}, "
                  f"largest radius difference {gap:.1e}")


def check_amp_probe() -> bool:
    feats, labels = clustered(4000, 128, 5)
    head = engine.linear_head(128, 20).to(CUDA)
    schedule = engine.Schedule(epochs=5, lr=0.01, milestones=[], print_freq=5)
    with tempfile.TemporaryDirectory() as folder:
        result = engine.fit(head, torch.optim.Adam(head.parameters(), 0.01),
                            epoch_batches=engine.feature_loader(feats[:3000], labels[:3000], 128),
                            validate=lambda: engine.feature_accuracy(head, feats[3000:], labels[3000:], CUDA),
                            schedule=schedule, device=CUDA, seed=0, checkpoint=os.path.join(folder, "head.pth"),
                            amp=True)
    return report("linear probe, --amp", result["top1"] >= 90,
                  f"top-1 {result['top1']:.1f} % after 5 epochs on 20 separable clusters")


def check_nccl() -> bool:
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "nccl_all_reduce.py")
        with open(script, "w") as f:
            f.write(NCCL_SCRIPT)
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "1", script], capture_output=True, text=True, timeout=180)
    ok = done.returncode == 0 and "all_reduce 12.0" in done.stdout
    last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
    return report("torchrun nccl", ok, f"exit {done.returncode}: {last[0]}")


def run(check: Callable[[], bool]) -> bool:
    """A check's verdict; an exception is its FAIL line."""
    try:
        return check()
    except Exception as err:
        return report(check.__name__.removeprefix("check_"), False, f"{type(err).__name__}: {err}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: skipped")
        return 0
    checks: list[Callable[[], bool]] = [check_extraction, check_coreset, check_herding, check_dcom_radii,
                                        check_amp_probe, check_nccl]
    if faiss_uses_gpu(CUDA):
        checks += [check_flat_search, check_kmeans]
    else:
        report("faiss GPU", False, "faiss has no GPU support here: install it with `make setup GPU=1`")
    verdicts = [run(check) for check in checks]
    return 0 if all(verdicts) and faiss_uses_gpu(CUDA) else 1


if __name__ == "__main__":
    sys.exit(main())
