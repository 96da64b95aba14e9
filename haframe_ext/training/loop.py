"""One training run's loop: setup, resume, the step, the end of each epoch (validation, checkpoints, log) and the
final test. :func:`haframe_ext.train.train` claims the folder and handles errors around it."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, NoReturn, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .config import TrainConfig, build_from_config, checkpoint_frame_directions, checkpoint_frame_profile
from .distributed import DistContext, GlobalBatchSampler, derive_seed
from .epoch_end import finish_epoch, write_results
from .evaluation import eval_loader, evaluate, valid_ks
from ..frame.align import align_model_frame
from ..hierarchy.hierarchy import Hierarchy
from ..nn import HAFrameLoss
from .optim import (FeaturesOnly, autocast_factory, compute_loss, grad_norm, non_finite_state, param_groups,
                    seed_everything, set_lr, worker_init)
from .resume import find_resume_checkpoint, inputs_digest, restore_state
from .run_state import Run, kept_message
from .runlog import RunLog, write_json

__all__ = ["TrainingDivergedError", "run_training"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def _setup(config: TrainConfig, dctx: DistContext) -> Run:
    """Build the run's model, loss, optimizer and schedule; refuse what would fail only later."""
    built = build_from_config(config)
    K = built["hierarchy"].num_classes
    ks = valid_ks(config.eval_ks, K)
    metrics = ["top1", "mistake_severity"] + [f"hierdist@{k}" for k in ks]
    if config.select_metric not in metrics:  # refused now, not after the first epoch has trained
        raise ValueError(f"select_metric {config.select_metric!r} is not a validation metric of this run "
                         f"(K={K}, eval_ks {list(config.eval_ks)}); choose one of {', '.join(metrics)} "
                         "(--select-metric)")
    model = built["model"].to(dctx.device)
    built["criterion"].to(dctx.device)
    optimizer = torch.optim.SGD(param_groups(model, config), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    autocast, scaler = autocast_factory(config, dctx.device)
    if config.batch_size % dctx.world != 0:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {dctx.world} processes")
    per_rank = config.batch_size // dctx.world
    n_train = len(built["datasets"]["train"])
    if n_train < 2:
        raise ValueError(f"the training set has {n_train} samples; need at least 2")
    for split in ("val", "test"):  # found now, not after every epoch has trained
        if len(built["datasets"][split]) == 0:
            raise ValueError(f"the {split} split has no samples: give it data (--data-root), or for synthetic data "
                             "--eval-per-class / --eval-samples >= 1")
    steps_per_epoch = len(GlobalBatchSampler(n_train, per_rank, dctx.world, dctx.rank))
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({n_train} samples) is too small for {dctx.world} process(es)")
    return Run(config, dctx, built, optimizer, autocast, scaler, ks,
                inputs=inputs_digest(built["hierarchy"], built["distances"]), per_rank=per_rank,
                total_steps=steps_per_epoch * config.epochs,
                warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
                best={"metric": config.select_metric, "value": None, "epoch": None})


def _resume(run: Run) -> None:
    """Continue from the run's checkpoint (resume / resume_from): its weights, optimizer, RNG and progress."""
    config = run.config
    if not (config.resume or config.resume_from):
        return
    found = find_resume_checkpoint(config, run.out, run.built["hierarchy"], run.inputs, run.dctx.device)
    if found is None:
        return
    path, ck = found
    restore_state(ck, path, run.dctx.rank, run.model, run.optimizer, run.criterion, run.scaler)
    run.start_epoch = int(ck["epoch"])
    run.step = int(ck["scheduler"]["step"])
    run.best = dict(ck["best"])
    run.history = list(ck.get("history", []))
    run.resumed_from = str(path)
    run.good = (path, run.start_epoch)


def _align_frame(run: Run) -> None:
    """A projected HAFrame (dim < K, from a tree) takes its node directions and its kernel from the untrained
    model's class-mean features (TrainConfig.frame_directions and frame_profile, haframe_ext.frame.align); the
    RNG streams are untouched."""
    config, dctx, tree = run.config, run.dctx, run.built["distances"]
    if not isinstance(tree, Hierarchy):
        return
    directions = checkpoint_frame_directions(config.to_dict(), tree.num_classes)
    profile = checkpoint_frame_profile(config.to_dict(), tree.num_classes)
    if "features" not in (directions, profile):
        return
    train_set = run.built["datasets"]["train"]
    loader = torch.utils.data.DataLoader(train_set, batch_size=config.eval_batch_size, shuffle=False,
                                         num_workers=config.num_workers, generator=torch.Generator())
    with torch.random.fork_rng(devices=[dctx.device] if dctx.device.type == "cuda" else []):
        run.built["frame"] = align_model_frame(run.model, tree, loader, config.gamma, s_min=config.s_min,
                                               seed=config.seed, directions=directions, profile=profile,
                                               profile_weight=config.frame_profile_weight)
    if dctx.enabled:  # every rank read the same samples; rank 0's frame is the one, to the last bit
        cl = run.model.classifier
        state = cl.state_dict()
        torch.distributed.broadcast(state["weight"], 0)
        if state.get("similarity") is not None:
            torch.distributed.broadcast(state["similarity"], 0)
        cl.load_state_dict(state)


def _network(run: Run) -> nn.Module:
    """The module the step calls: the model (or its features only), in DDP under torchrun."""
    net = FeaturesOnly(run.model) if run.features_only else run.model
    if run.dctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = run.dctx.device
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


# ----------------------------------------------------------------------------- the loop
def run_training(config: TrainConfig, dctx: DistContext) -> Dict[str, Any]:
    """One run in a claimed folder: setup, resume, the epochs (steps, then the end of epoch), the final test."""
    t_start = time.perf_counter()
    dctx.barrier()
    seed_everything(derive_seed(config.seed, 0, dctx.rank))
    run = _setup(config, dctx)
    _align_frame(run)  # before the resume too, so that run.built["frame"] is the checkpoint's frame
    _resume(run)
    run.net = _network(run)  # after the resume: DDP starts from the restored weights
    run.log = RunLog(run.out, dctx.main, config.tensorboard)
    try:
        if dctx.main:
            write_json(config.to_dict(), run.out / "config.json")
            if run.resumed_from:
                run.log.log({"event": "resumed", "from": run.resumed_from, "epoch": run.start_epoch})
        val_loader = eval_loader(run.built["datasets"]["val"], config.eval_batch_size, dctx, config.num_workers)
        _show_frame(run)
        epochs_run = 0
        for epoch in range(run.start_epoch, config.epochs):
            if config.stop_after_epochs is not None and epochs_run >= config.stop_after_epochs:
                break
            t0 = time.perf_counter()
            train_loss, train_top1, lr_now = _train_epoch(run, epoch)
            _end_epoch(run, epoch, val_loader, {"train_loss": train_loss, "train_top1": train_top1, "lr": lr_now}, t0)
            epochs_run += 1
        if run.start_epoch + epochs_run < config.epochs:
            return {"stopped_after_epoch": run.start_epoch + epochs_run, "finished": False, "out": str(run.out)}
        return _final_test(run, t_start)
    finally:
        run.log.close()


def _show_frame(run: Run) -> None:
    """With progress on, one line on an approximate frame (fewer dimensions than classes): what it gives up."""
    frame = run.built["frame"]
    approx = getattr(frame, "approximation", None)
    if run.show and approx:
        from tqdm.auto import tqdm

        tqdm.write(f"frame: K={run.built['hierarchy'].num_classes} classes in dim {frame.dim} < K, "
                   f"{approx['method']}: separation margin {approx['margin']:.3f} (exact frame "
                   f"{approx['exact_margin']:.3f}), mean |W W^T - S| {approx['gram_error_mean']:.3f} over "
                   f"{approx['pairs']}")


def _train_epoch(run: Run, epoch: int) -> Tuple[float, Optional[float], float]:
    """One epoch of steps; returns (mean training loss, training top-1 in percent or None, the last lr)."""
    from tqdm.auto import tqdm

    config, dctx, device = run.config, run.dctx, run.dctx.device
    seed_everything(derive_seed(config.seed, epoch + 1, dctx.rank))
    if isinstance(run.criterion, HAFrameLoss):
        run.criterion.set_epoch(epoch)
    g = torch.Generator().manual_seed(derive_seed(config.seed, epoch + 1, 2 * 10 ** 6))  # worker seeds
    train_set = run.built["datasets"]["train"]
    batches = GlobalBatchSampler(len(train_set), run.per_rank, dctx.world, dctx.rank, config.seed, epoch)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers,
                                         worker_init_fn=worker_init, generator=g, pin_memory=device.type == "cuda")
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=len(loader), desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", disable=not run.show,
               leave=False, dynamic_ncols=True)
    lr_now = config.lr
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        lr_now = set_lr(run.optimizer, config, run.step, run.total_steps, run.warmup_steps)
        loss, logits = _step(run, x, y, epoch, i)
        run.step += 1
        with torch.no_grad():
            loss_sum += loss.detach().double() * y.shape[0]
            if logits is not None:
                correct += (logits.argmax(1) == y).sum().double()
            seen += y.shape[0]
        if run.show and (i % 10 == 0 or i == len(loader) - 1):
            shown = {"loss": f"{(loss_sum / seen).item():.4f}"}
            if not run.features_only:
                shown["top1"] = f"{100.0 * (correct / seen).item():.2f}%"
            bar.set_postfix(**shown)
        bar.update(1)
    bar.close()
    stats = dctx.all_reduce(torch.stack([loss_sum, correct, seen]))
    train_loss = (stats[0] / stats[2].clamp_min(1)).item()
    # percent, as val top1; None where the step forms no logits (fixed frame + fused loss)
    train_top1 = None if run.features_only else 100.0 * (stats[1] / stats[2].clamp_min(1)).item()
    return train_loss, train_top1, lr_now


def _step(run: Run, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int):
    """One optimisation step on inputs x (B, ...) and labels y (B,); returns (loss, logits (B, K) or None).

    One flag pair per step, all-reduced (max) so that every rank stops at the same step: [loss non-finite,
    gradient norm non-finite].  Both are checked before ``optimizer.step()``, so a NaN/Inf never reaches the
    weights, the momentum or a checkpoint.
    """
    config, optimizer, scaler, model = run.config, run.optimizer, run.scaler, run.model
    with (run.autocast() if run.autocast is not None else contextlib.nullcontext()):
        feats, logits = (run.net(x), None) if run.features_only else run.net(x)
    loss = compute_loss(run.criterion, feats.float(), logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        # fp16 AMP: scaled gradients overflow to Inf now and then by design; GradScaler finds that after
        # unscaling and skips optimizer.step() (lowering the scale), so the weights stay finite and the
        # gradient-norm check is left to the scaler (flag 0 here).
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        norm = None
    else:
        loss.backward()
        if config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        else:
            norm = grad_norm(model)
    flags = torch.stack([~torch.isfinite(loss.detach()),
                         (~torch.isfinite(norm.detach())).to(loss.device) if norm is not None
                         else torch.zeros((), dtype=torch.bool, device=loss.device)]).to(torch.float32)
    if run.dctx.enabled:
        run.dctx.all_reduce(flags, op="max")
    loss_bad, grad_bad = (bool(v) for v in flags.tolist())
    if loss_bad or grad_bad:
        optimizer.zero_grad(set_to_none=True)
        _diverged_step(run, epoch, i, loss.item(), norm, loss_bad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss, logits


def _diverged_step(run: Run, epoch: int, i: int, loss: float, norm: Optional[torch.Tensor],
                   loss_bad: bool) -> NoReturn:
    """Stop at a step whose loss (``loss_bad``) or else gradient norm is non-finite on some rank."""
    if loss_bad:
        what = f"loss became {loss}" if not math.isfinite(loss) else "loss became non-finite in another process"
        advice = "Lower the learning rate or enable gradient clipping (--grad-clip)."
    else:
        value = norm.item() if norm is not None else float("nan")
        what = (f"the gradient norm became {value} (with a finite loss, {loss:.6g})" if not math.isfinite(value)
                else "the gradient norm became non-finite in another process")
        advice = ("Lower the learning rate, or look for an operation whose gradient is undefined "
                  "(e.g. sqrt or norm at 0) in the model or the loss.")
    _stop(run, f"{what} at epoch {epoch + 1}, step {i + 1}: training stopped; {kept_message(run.good)}. {advice}",
          epoch=epoch + 1, step=i + 1)


def _stop(run: Run, msg: str, **where: int) -> NoReturn:
    """Log the divergence (where it happened and ``msg``) and raise it."""
    run.log.log({"event": "diverged", **where, "message": msg})
    raise TrainingDivergedError(msg)


# ----------------------------------------------------------------------------- end of an epoch
def _end_epoch(run: Run, epoch: int, val_loader, train: Dict[str, Any], t0: float) -> None:
    """Refuse a non-finite state, validate, then track the best epoch and write the checkpoints and the log record
    (:func:`~haframe_ext.training.epoch_end.finish_epoch`).

    The state is checked first: NaN weights give NaN logits, which the evaluation refuses with a less useful message.
    ``train``: the epoch's train_loss, train_top1 and lr; ``t0``: when the epoch started (perf_counter).
    """
    _check_finite_state(run, epoch)
    val = evaluate(run.model, val_loader, run.built["distances"], run.ks, run.dctx.device, run.dctx,
                   autocast=run.autocast)
    finish_epoch(run, epoch, val, train, t0)


def _check_finite_state(run: Run, epoch: int) -> None:
    """Never checkpoint a non-finite state: with the gradient check of the step it can still come from a finite
    update that overflows, or from batch-norm statistics of Inf activations. Every rank checks, so all stop."""
    bad_state = non_finite_state(run.model, run.optimizer)
    flag = torch.tensor(0.0 if bad_state is None else 1.0, device=run.dctx.device)
    run.dctx.all_reduce(flag, op="max")
    if bool(flag.item()):
        where = f" ({bad_state})" if bad_state else " (in another process)"
        _stop(run, f"the model state became non-finite (NaN or Inf) during epoch {epoch + 1}{where}: training "
                   f"stopped without writing its checkpoint; {kept_message(run.good)}. Lower the learning rate "
                   "or enable gradient clipping (--grad-clip).", epoch=epoch + 1)


# ----------------------------------------------------------------------------- final test
def _final_test(run: Run, t_start: float) -> Dict[str, Any]:
    """Evaluate the best epoch's weights on the test split; rank 0 writes results.json (epoch_end.write_results)."""
    config, dctx = run.config, run.dctx
    if (run.out / "best.pt").exists():
        run.model.load_state_dict(load_checkpoint(run.out / "best.pt", map_location="cpu", kind="best")["model"])
    test_loader = eval_loader(run.built["datasets"]["test"], config.eval_batch_size, dctx, config.num_workers)
    test_all, feats, labels = evaluate(run.model, test_loader, run.built["distances"], run.ks, dctx.device, dctx,
                                       crm=True, collect=True, autocast=run.autocast)
    return write_results(run, test_all, feats, labels, t_start)
