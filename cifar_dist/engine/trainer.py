"""The training loop: the same code on one CPU, one GPU, many GPUs and many nodes.

The run is assembled by `engine.build` and saved by `engine.checkpoint`. Randomness is derived
from (seed, rank, epoch, step) at every step, so a resumed run needs no RNG stream from the past
and continues bitwise like an uninterrupted one (train.deterministic=true). Stop, checkpoint and
non-finite flags are agreed by all ranks at every step (`engine.step_flags`): a non-finite step is
masked out on the device (`engine.masked_step`), and the host reads the flags one step late, so no
step waits for the device and every rank takes the same branch at the same step.
"""
from __future__ import annotations

import contextlib
import enum
import sys
import time
from itertools import islice

import torch

from cifar_dist.augment.pipeline import make_generator
from cifar_dist.config import Config, config_to_dict
from cifar_dist.cifar10 import CLASS_NAMES
from cifar_dist.engine import checkpoint
from cifar_dist.engine.build import build_run
from cifar_dist.engine.checkpoint import Progress, float_buffers
from cifar_dist.engine.distributed import DistEnv, all_reduce_, average_tensors_, broadcast_object
from cifar_dist.engine.evaluation import score_split
from cifar_dist.engine.loss import soft_target_cross_entropy
from cifar_dist.engine.masked_step import MaskedStep
from cifar_dist.engine.profiling import StepProfiler
from cifar_dist.engine.run_log import RunLength, RunLogger
from cifar_dist.engine.run_log.wandb_sink import check_wandb
from cifar_dist.engine.run_dir import RunFolder, resolve_run_dir
from cifar_dist.engine.step_flags import PendingFlags, StepFlags, agree
from cifar_dist.engine.stopping import INTERRUPT, StopRequests
from cifar_dist.errors import ConfigError, ExitCode, UserError, exit_status, one_line
from cifar_dist.outputs import check_writable
from cifar_dist.run_files import BEST, BEST_EMA, LAST
from cifar_dist.metrics import per_class_scores
from cifar_dist.peak_flops import mfu


class Outcome(enum.Enum):
    """How `Trainer.fit` ended: (what happened, the exit code it maps to, the status.json word)."""

    FINISHED = ("finished", ExitCode.FINISHED, "finished")
    MAX_STEPS = ("reached train.max_steps", ExitCode.FINISHED, "max_steps")
    PREEMPTED = ("stopped by SIGTERM/SIGUSR2", ExitCode.PREEMPTED, "stopped")
    INTERRUPTED = ("stopped by Ctrl-C", ExitCode.INTERRUPTED, "stopped")
    DIVERGED = ("stopped: the loss is not finite", ExitCode.DIVERGED, "diverged")

    @property
    def description(self) -> str:
        return self.value[0]

    @property
    def exit_code(self) -> ExitCode:
        return self.value[1]

    @property
    def status(self) -> str:
        return self.value[2]


class EpochMeter:
    """Loss, accuracy and seconds of one epoch, kept on the device until read."""

    def __init__(self, device: torch.device, carried: dict):
        self.carried = carried or {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count, self.start = 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One micro-batch: the sum of its per-image losses, its logits and labels."""
        self.loss_sum += loss_sum.double()
        self.correct += (logits.detach().argmax(dim=1) == labels).sum()
        self.count += len(labels)

    def totals(self) -> dict:
        """The epoch so far over all ranks (collective), the part before a resume included."""
        sums = torch.tensor([float(self.loss_sum), float(self.correct), float(self.count)], dtype=torch.float64,
                            device=self.loss_sum.device)
        all_reduce_(sums)
        c = self.carried
        return {"loss": c["loss"] + sums[0].item(), "correct": c["correct"] + int(sums[1]),
                "count": c["count"] + int(sums[2]), "seconds": c["seconds"] + time.perf_counter() - self.start}


class Trainer:
    """One training run on this rank. `fit()` trains to the end or a stop; `run_epoch()` is one epoch of the
    same loop, for those who time it (the benchmarks). Use it as a context manager, or call `close()`."""

    def __init__(self, cfg: Config, env: DistEnv, log=print):
        self.cfg, self.env = cfg, env
        self.log = log if env.is_main else (lambda *a, **k: None)
        check_wandb(cfg.logging.wandb)
        self.run_dir = resolve_run_dir(cfg, env)
        self.folder = RunFolder(self.run_dir)
        self._agree_on_problem(self._folder_problem() if env.is_main else None)  # before the data is read
        self.run = build_run(cfg, env)
        self.run.plan.run_dir = str(self.run_dir)
        state = checkpoint.load_resume_state(self.run_dir, cfg.train.resume, log=self.log)
        self.progress = checkpoint.restore(self.run, state, cfg, env, self.log) if state else Progress()
        # Everything checked: only now does the run folder come to exist, with rank 0 as its one writer.
        self._agree_on_problem(self._claim_folder() if env.is_main else None)
        if state:
            self.log(f"resumed from {self.run_dir}: {self._position()}")
        self.log("run plan:\n" + "\n".join(self.run.plan.lines()))
        if self.run.plan.eval_split == "test":
            self.log("data.val_fraction=0: no val split, so each epoch is evaluated on the test split")
        plan = self.run.plan
        self.logger = RunLogger(self.run_dir, cfg.logging, enabled=env.is_main, config_dict=config_to_dict(cfg),
                                wandb_run_id=self.progress.wandb_run_id,
                                length=RunLength(plan.stop_step, plan.steps_per_epoch, plan.global_batch_size))
        self.progress.wandb_run_id = self.logger.wandb_run_id
        if self.progress.history:
            self.logger.load_history(self.progress.history)
        self.stops = StopRequests(self.log)
        self.last_checkpoint_time = time.monotonic()
        self.trainable = [q for q in self.run.model.parameters() if q.requires_grad]
        self.masked = MaskedStep(self.run.optimizer, self.run.model, self.run.ema)
        self.pending: PendingFlags | None = None  # the flags of the last step, on their way to the host
        self.profiler = StepProfiler(cfg.train.profile, self.run_dir, env, cfg.train.profile_all_ranks)

    def _agree_on_problem(self, problem: str | None) -> None:
        """Every rank raises rank 0's ConfigError (collective), so all stop together."""
        problem = broadcast_object(problem)
        if problem:
            raise ConfigError(problem)

    def _folder_problem(self) -> str | None:
        """Why the run folder cannot be this run's (not writable, or another training holds it), if so."""
        try:
            check_writable(self.run_dir, "run.dir", folder=True)
        except ConfigError as err:
            return str(err)
        return self.folder.busy()

    def _claim_folder(self) -> str | None:
        """Create and lock the run folder, describe the run in it, start train.log; the problem, if any."""
        try:
            self.folder.claim()
        except ConfigError as err:
            return str(err)
        self.folder.copy_console()
        self.folder.write_description(self.cfg, self.run.plan)
        self.folder.set_status("running", step=self.progress.global_step, total_steps=self.run.plan.total_steps)
        return None

    def _position(self) -> str:
        """Where the loop stands, in the numbering of the epoch lines: 'in epoch 4, after step 150 of 476'."""
        p, total = self.progress, self.run.plan.total_steps
        where = "in" if p.partial_epoch else "at the start of"
        return f"{where} epoch {p.epoch + 1}, after step {p.global_step} of {total}"

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish the reports (a profile still recording, the progress bar, wandb) and let go of the run folder."""
        self._report_profile(self.profiler.close())
        self.logger.close()
        self.folder.release()

    def fit(self) -> Outcome:
        """Train to train.epochs, or until stopped; the Outcome carries its exit code. status.json records
        how the run ended (with the cause when it failed). The caller closes the trainer."""
        with self.stops:
            try:
                outcome = self._fit()
            except UserError as err:
                self._set_status(exit_status(ExitCode.USER_ERROR), cause=one_line(err),
                                 exit_code=int(ExitCode.USER_ERROR))
                raise
            except KeyboardInterrupt:
                self._set_status("stopped", cause="aborted by a second Ctrl-C",
                                 exit_code=int(ExitCode.INTERRUPTED))
                raise
            except BaseException as err:
                self._set_status(exit_status(ExitCode.CRASHED), cause=f"{type(err).__name__}: {one_line(err)}",
                                 exit_code=int(ExitCode.CRASHED))
                raise
            self._set_status(outcome.status, cause=outcome.description, exit_code=int(outcome.exit_code))
            return outcome

    def _set_status(self, status: str, **details) -> None:
        """status.json on rank 0; a failing write (a full disk) is reported and never hides the run's own
        outcome or error."""
        if not self.env.is_main:
            return
        try:
            self.folder.set_status(status, step=self.progress.global_step, total_steps=self.run.plan.total_steps,
                                   **details)
        except (OSError, UserError) as err:
            print(f"warning: cannot record status {status!r} in {self.run_dir}: {one_line(err)}", file=sys.stderr,
                  flush=True)

    def _fit(self) -> Outcome:
        p, max_steps = self.progress, self.cfg.train.max_steps
        results = None
        while p.global_step < self.run.plan.total_steps:
            outcome = self._train_epoch(save=True)
            if outcome is Outcome.MAX_STEPS:
                self._report_partial_epoch()
            if outcome is not None:
                return outcome
            results = self._end_epoch()
            stop = self._agree_on_stop()  # a signal that came during evaluation
            if stop:
                return Outcome.INTERRUPTED if stop == INTERRUPT else Outcome.PREEMPTED
            if max_steps and p.global_step >= max_steps:
                return Outcome.MAX_STEPS
        self._final_report(results or self.score_model_and_ema(tta_level=0))
        return Outcome.FINISHED

    def run_epoch(self, evaluate: bool = True, save: bool = True) -> Outcome | None:
        """One epoch of the loop `fit` runs, as it runs it, or without the evaluation and logging at its end
        (evaluate=False) and without any checkpoint write (save=False, also none on the time interval).
        None when the epoch ended, else the Outcome that stopped it."""
        outcome = self._train_epoch(save)
        if outcome is not None:
            return outcome
        if evaluate:
            self._end_epoch(save)
        else:
            self._next_epoch()
        return None

    def _train_epoch(self, save: bool) -> Outcome | None:
        """Train to the end of the epoch (None, its sums in progress.partial_epoch), or to a stop."""
        run, tc, p = self.run, self.cfg.train, self.progress
        accum, steps = tc.grad_accum_steps, run.plan.steps_per_epoch
        end = min(steps, run.plan.total_steps - p.epoch * steps)  # a fractional last epoch ends early
        start = p.global_step - p.epoch * steps
        run.train_loader.set_epoch(p.epoch)
        run.net.train()
        meter = EpochMeter(self.env.device, p.partial_epoch)
        self.logger.start_epoch(p.epoch + 1, end)
        step_loss = None
        for micro_step, (images, labels) in enumerate(islice(run.train_loader, start * accum, end * accum),
                                                     start=start * accum):
            if micro_step % accum == 0:
                self.profiler.before_step(p.global_step)
            inputs, targets = run.augment(images, labels, self._seed_step(micro_step), epoch=p.epoch)
            last_micro = (micro_step + 1) % accum == 0
            with contextlib.nullcontext() if last_micro or not self.env.distributed else run.net.no_sync():
                with run.autocast():
                    logits = run.net(inputs)
                losses = soft_target_cross_entropy(logits, targets, tc.label_smoothing, reduction="none")
                run.scaler.scale(losses.sum() * run.loss_scale).backward()
            loss_sum = losses.detach().sum()
            meter.add(loss_sum, logits, labels)
            step_loss = loss_sum if step_loss is None else step_loss + loss_sum
            if not last_micro:
                continue
            previous = self._optimizer_step(step_loss)  # the flags of the step before this one
            step_loss = None
            self._report_profile(self.profiler.after_step(p.global_step))
            if self._diverged():
                return Outcome.DIVERGED
            step_in_epoch = p.global_step - p.epoch * steps
            self.logger.step(step_in_epoch, p.global_step, losses.detach().mean(), run.scheduler.get_last_lr()[0])
            stop, due = (previous.stop, previous.checkpoint_due) if previous else (0, False)
            reached_max = tc.max_steps and p.global_step >= tc.max_steps
            if (stop or due and save or reached_max) and step_in_epoch < end:
                self._settle()  # this step's own flags, before its state is kept
                if self._diverged():
                    return Outcome.DIVERGED
                p.partial_epoch = meter.totals()
                if save:
                    self.save(LAST)
                    self.log(f"checkpoint: {self.run_dir / LAST} at step {p.global_step}")
                if stop:
                    return Outcome.INTERRUPTED if stop == INTERRUPT else Outcome.PREEMPTED
                if reached_max:
                    return Outcome.MAX_STEPS
        self._settle()
        if self._diverged():
            return Outcome.DIVERGED
        p.partial_epoch = meter.totals()
        return None

    def _seed_step(self, micro_step: int) -> torch.Generator:
        """Dropout and augmentation randomness of one micro-step, from (seed, rank, epoch, step)."""
        seed, rank, epoch = self.cfg.train.seed, self.env.rank, self.progress.epoch
        dropout_seed = make_generator(seed, rank, epoch, -1 - micro_step, "cpu").initial_seed()
        # The host's and this device's default generators only: torch.manual_seed would also queue a
        # seed for every CUDA device, formatting a stack trace each step (~6 ms) where CUDA is not started.
        torch.default_generator.manual_seed(dropout_seed)
        if self.env.device.type == "cuda":
            torch.cuda.manual_seed(dropout_seed)
        return make_generator(seed, rank, epoch, micro_step, self.env.device)

    def _agree(self, loss: torch.Tensor, update_nonfinite: torch.Tensor) -> tuple[torch.Tensor, PendingFlags]:
        """This step's flags, agreed by all ranks in one small all-reduce on the device; (ok, pending): ok keeps the
        step (on the device), pending carries the flags to the host, which reads them after the next step."""
        return agree(self.progress.global_step + 1, loss, update_nonfinite, self.stops.kind, self._checkpoint_due(),
                     self.env.distributed)

    def _checkpoint_due(self) -> bool:
        """train.checkpoint_interval_min has passed since the last checkpoint or the last time it was asked for
        (the checkpoint it asks for comes a step later)."""
        interval_s, now = self.cfg.train.checkpoint_interval_min * 60, time.monotonic()
        if interval_s > 0 and now - self.last_checkpoint_time > interval_s:
            self.last_checkpoint_time = now
            return True
        return False

    def _agree_on_stop(self) -> int:
        """The stop request of any rank, now (collective, with a host read: between epochs only)."""
        if not self.env.distributed:
            return self.stops.kind
        kind = torch.tensor([self.stops.kind], device=self.env.device)
        all_reduce_(kind, op=torch.distributed.ReduceOp.MAX)
        return int(kind.item())

    def _optimizer_step(self, step_loss: torch.Tensor) -> StepFlags | None:
        """Unscale, clip, step, with no host read. A step whose loss or update is not finite is put back on the
        device (`MaskedStep`) and counts toward train.max_nonfinite_steps; an fp16 overflow of the gradient is
        put back too but not counted: it is the scaler's business (it lowers its scale). The schedule steps
        either way. Returns the flags of the step before, read now that this one is queued (None at the first)."""
        run, tc, p = self.run, self.cfg.train, self.progress
        run.scaler.unscale_(run.optimizer)
        if tc.grad_clip_norm:  # a non-finite norm makes the gradient, and so the update, non-finite
            torch.nn.utils.clip_grad_norm_([q for q in self.trainable if q.grad is not None], tc.grad_clip_norm)
        previous = self._settle()  # waits for the step before this one only
        step = p.global_step + 1
        taken = self.masked.take(lambda: run.ema.update(run.model, step),
                                 ema_updates=run.ema.enabled and step % run.ema.every == 0)
        ok, self.pending = self._agree(step_loss, taken.nonfinite)
        self.pending.taken = taken
        self.masked.keep(taken, ok)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        p.global_step = step
        if p.global_step == run.plan.total_steps:
            run.ema.finish(run.model)
        return previous

    def _settle(self) -> StepFlags | None:
        """Read the flags of the last step taken (waiting for that step only) and take them in: the host values a
        skipped step changed put back, the count of non-finite steps and its warning. None when there are none."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        flags, p = pending.read(), self.progress
        if flags.skipped:
            self.masked.undo_host(pending.taken)
        if flags.loss_nonfinite or flags.update_nonfinite and not self.run.scaler.is_enabled():
            p.nonfinite_streak += 1
            p.nonfinite_total += 1
            self.log(f"warning: non-finite loss or gradient at step {flags.step}: step skipped "
                     f"({p.nonfinite_streak} in a row)")
        elif not flags.skipped:
            p.nonfinite_streak = 0
        return flags

    def _diverged(self) -> bool:
        """Whether the run ends here: train.max_nonfinite_steps non-finite steps in a row (said once, here)."""
        streak, limit = self.progress.nonfinite_streak, self.cfg.train.max_nonfinite_steps
        if streak < limit:
            return False
        self.log(f"error: {streak} consecutive steps with a non-finite loss (limit "
                 f"train.max_nonfinite_steps={limit}); stopping. The last good checkpoint "
                 f"{self.run_dir / LAST} is intact: lower train.lr or enable gradient clipping")
        return True

    def _report_profile(self, files: list) -> None:
        """Say where the profiler wrote, and attach the files to the wandb run."""
        if files:
            self.log("profile: " + ", ".join(map(str, files)))
            self.logger.attach(files)

    def save(self, *names: str) -> None:
        """Write the run's state under names in run.dir (collective); the flags of the last step are taken in
        first, so that the progress saved counts it."""
        self._settle()
        state = checkpoint.capture(self.run, self.progress, self.cfg, self.env)  # collective
        if self.env.is_main:
            for name in names:
                checkpoint.save(state, self.run_dir / name, keep_previous=name == LAST)
        self.last_checkpoint_time = time.monotonic()

    def score_model_and_ema(self, tta_level) -> dict[str, dict]:
        """The model and its EMA on the eval split, BN buffers and EMA first made equal on all ranks."""
        run = self.run
        average_tensors_(float_buffers(run.model))
        run.ema.sync()
        nets = {"model": run.net, **({"ema": run.ema.module} if run.ema.enabled else {})}
        tc = self.cfg.train
        return {kind: score_split(net, run.eval_loader, run.eval_transform, self.cfg.model.num_classes, run.autocast,
                                  tta_level, tc.tta_average, tc.tta_fraction if tta_level else 1.0)
                for kind, net in nets.items()}

    def _next_epoch(self) -> dict:
        """Move on to the next epoch; returns the sums `_train_epoch` left for the finished one."""
        p, sums = self.progress, self.progress.partial_epoch
        p.epoch += 1
        p.partial_epoch = {}
        return sums

    def _end_epoch(self, save: bool = True) -> dict[str, dict]:
        """Evaluate, log and checkpoint the epoch whose sums are in progress.partial_epoch."""
        p = self.progress
        results = self.score_model_and_ema(tta_level=0)
        sums = self._next_epoch()
        record = self._epoch_record(p.epoch, sums, results)
        p.history.append(record)
        self.logger.end_epoch(record)
        names = [LAST]
        for kind, name in (("model", BEST), ("ema", BEST_EMA)):
            if kind in results and results[kind]["count"] and results[kind]["acc"] > p.best[kind]:
                p.best[kind] = results[kind]["acc"]
                names.append(name)
        if save:
            self.save(*names)
        return results

    def _report_partial_epoch(self) -> None:
        """A train.max_steps stop in mid-epoch: the epoch so far, evaluated, in the log lines and metric files.
        The checkpoint's history (written before) leaves it out, so a resumed run replaces it."""
        p, steps = self.progress, self.run.plan.steps_per_epoch
        record = self._epoch_record(round(p.epoch + (p.global_step - p.epoch * steps) / steps, 3),
                                    p.partial_epoch, self.score_model_and_ema(tta_level=0))
        self.logger.end_epoch({**record, "partial": True})

    def _epoch_record(self, epoch, sums: dict, results: dict[str, dict]) -> dict:
        """One line of metrics.jsonl: the epoch's training sums (over all ranks) and its evaluation."""
        count, seconds = max(sums["count"], 1), max(sums["seconds"], 1e-9)
        plan = self.run.plan
        tflops = plan.train_flops_per_image * sums["count"] / seconds / 1e12
        record = {
            "epoch": epoch, "global_step": self.progress.global_step,
            "train_loss": sums["loss"] / count, "train_acc": sums["correct"] / count,
            "val_loss": results["model"]["loss"], "val_acc": results["model"]["acc"],
            "val_count": results["model"]["count"], "lr": self.run.scheduler.get_last_lr()[0],
            "images_per_s": sums["count"] / seconds, "epoch_s": sums["seconds"],
            "peak_memory_mb": peak_memory_mb(self.env.device), "nonfinite_steps": self.progress.nonfinite_total,
            "tflops": tflops,
        }
        utilisation = mfu(tflops, plan.peak_tflops * plan.world_size)
        if utilisation is not None:
            record["mfu"] = utilisation
        if "ema" in results:
            record.update(ema_val_loss=results["ema"]["loss"], ema_val_acc=results["ema"]["acc"])
        return record

    def _final_report(self, plain: dict[str, dict]) -> None:
        """Per-class precision, recall, F1 of the last epoch; accuracy with TTA when train.tta is set."""
        tta_level = self.cfg.train.tta
        with_tta = self.score_model_and_ema(tta_level) if tta_level else {}
        final = {kind: {"acc": r["acc"], "loss": r["loss"], "count": r["count"]} for kind, r in plain.items()}
        final.update({f"{kind}_tta{tta_level}": {"acc": r["acc"], "loss": r["loss"], "count": r["count"]}
                      for kind, r in with_tta.items()})
        scores = {kind: per_class_scores(r["confusion"]) for kind, r in plain.items()}
        self.logger.log_final(final, scores, plain["model"]["confusion"], CLASS_NAMES)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
