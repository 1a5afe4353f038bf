"""The QAT training loop: optimizer steps over a loader with optional distillation from the FP32 model and mixup,
a progress bar with the loss on rank 0. It trains any model; the QAT model comes from amct's
create_quant_retrain_model or openamct.core.qat.prepare_retrain."""
import contextlib
import itertools

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core.fileio import is_main_process


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """(1 - weight) * cross-entropy on the labels + weight * T^2 * KL(teacher || student) on softened logits
    (Hinton et al. 2015): the FP32 model's outputs carry far more information per image than a label."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - weight) * hard + weight * soft


def _loss(logits, teacher_logits, labels, kd_weight: float, temperature: float) -> torch.Tensor:
    if teacher_logits is None:
        return F.cross_entropy(logits, labels)
    return distillation_loss(logits, teacher_logits, labels, kd_weight, temperature)


class PeerLost(RuntimeError):
    """Another process of a distributed run stopped: this one stops too, instead of waiting for it."""


@contextlib.contextmanager
def _peers_watched():
    """Under DDP, a collective (buffer broadcast, gradient all-reduce) that fails because another process died
    becomes PeerLost, with the backend's own first line."""
    try:
        yield
    except RuntimeError as err:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeerLost(f"rank {dist.get_rank()}: the distributed run lost a process ({first}); stopping") from err


def train(model: nn.Module, loader, steps: int, optimizer, *, scheduler=None, teacher: nn.Module | None = None,
          kd_weight: float = 0.0, temperature: float = 1.0, mixup: float = 0.0, seed: int = 0, device=None,
          print_freq: int = 0, log_fn=print, resume: dict | None = None, checkpoint=None,
          checkpoint_every: int = 0) -> list[float]:
    """Run `steps` optimizer steps over `loader` (cycled), with optional distillation from `teacher`; a progress
    bar on rank 0 shows the loss and learning rate. Returns the loss of each step.

    `mixup` > 0 trains on each batch blended with its reverse, lam * x + (1 - lam) * x[::-1], lam ~ Beta(mixup,
    mixup) drawn from `seed`; the label loss is blended alike and the teacher labels the blended images, so a few
    hundred images give many distinct targets (Beyer et al. 2022, "Knowledge distillation: a good teacher is
    patient and consistent").

    Every `checkpoint_every` steps `checkpoint(state)` gets what, with the model's, the optimizer's and the
    scheduler's states, continues the run: `resume=state` starts from there. The loader must then give the same
    batches for the same epoch (EpochSampler with a seeded augmentation); the batches of the epoch already
    trained are drawn again and skipped, and each rank's torch generator (dropout) is restored."""
    if not mixup >= 0:
        raise ValueError(f"mixup: expected alpha >= 0 (0: off), got {mixup}")
    blend = np.random.default_rng(seed)
    losses, step = [], 0
    if resume is not None:
        losses, step = list(resume["losses"]), resume["step"]
        blend.bit_generator.state = resume["mixup_rng"]
        torch.set_rng_state(resume["torch_rng"][_rank()])
    model.train()
    if teacher is not None:
        teacher.eval()
    per_epoch = len(loader) if hasattr(loader, "__len__") else 0
    epoch, done_in_epoch = divmod(step, per_epoch) if per_epoch and step else (0, 0)
    bar = tqdm(total=steps, initial=step, desc="retrain", unit="step", disable=not is_main_process())
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch += 1
        for images, labels in itertools.islice(loader, done_in_epoch, None):
            if device is not None:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lam = float(blend.beta(mixup, mixup)) if mixup > 0 else 1.0
            if lam < 1.0:
                images = lam * images + (1 - lam) * images.flip(0)
            with _peers_watched():
                logits, teacher_logits = model(images), None
                if teacher is not None and kd_weight > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                loss = _loss(logits, teacher_logits, labels, kd_weight, temperature)
                if lam < 1.0:  # the label loss blended as the images were
                    loss = lam * loss + (1 - lam) * _loss(logits, teacher_logits, labels.flip(0), kd_weight,
                                                          temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.3g}")
            bar.update()
            if print_freq and step % print_freq == 0 and is_main_process():
                log_fn(f"step {step}/{steps}: loss {losses[-1]:.4f}, lr {lr:.3g}")
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoint({"step": step, "losses": losses, "mixup_rng": blend.bit_generator.state,
                            "torch_rng": _gathered_rng()})
            if step >= steps:
                break
        done_in_epoch = 0
    bar.close()
    return losses


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gathered_rng() -> list:
    """Every rank's torch generator state, by rank (what a resumed run restores on each)."""
    state = torch.get_rng_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
