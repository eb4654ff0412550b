"""``t2r finetune``: the training loop (accelerate), stage by stage, resumable at any step.

The run, top to bottom (``Run.run``): set up (data, model, optimizer), evaluate the starting point,
then for each stage, for each optimizer step: ``train_step``, then log / evaluate / checkpoint as
configured; then write OUTPUT/model (and adapter/) and run_summary.json. What goes where in OUTPUT is
``run_folder``'s; dtypes and FSDP are ``precision``'s; metrics and trackers are ``tracking``'s.

Losses are sums over tokens divided by the token count of the whole global batch (every
process, every accumulation micro-step), so 1 process and N processes at the same global
batch compute the same loss and the same update.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from ..errors import T2RError
from ..hub import ALIAS_LICENSES
from ..paths import check_writable_dir
from .checkpoint import TrainerState, intact_checkpoint, latest_checkpoint, read_trainer_state, save_checkpoint
from .compiled_layers import compile_layers, resolve_compile
from .config import AttentionTransferStage, FinetuneStage, RunConfig, dump_config, resume_mismatch
from .data import RowOrder, collate, load_sources, map_bars, packed_rows
from .fused_layers import resolve_fused_layers, use_fused_layers
from .lock import run_lock
from .losses import resolve_fused
from .model_folders import link_checkpoint_model, merged_from_folders, save_adapter, save_model_folder
from .precision import Precision, check_fsdp_has_cuda, mixed_precision
from .profiling import StepProfiler, phase
from .run_folder import ACCELERATE_STATE, ADAPTER, MODEL, RunFolder
from .stages import (add_lora, count_targets, frozen_teacher, load_model, lora_input_casts_off, run_lora_config,
                     stage_loss_sum)
from .tracking import MetricsFile, tracker_config, trackers


class RunStopped(T2RError):
    """The run stopped early (signal or non-finite loss); the message says how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def learning_rate(stage, step: int) -> float:
    """The stage's learning rate at optimizer step ``step`` (0-based) of that stage."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return stage.lr
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if stage.schedule == "cosine" else 1 - progress
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * shape)


class Run:
    def __init__(self, config: RunConfig, resume: bool = False, log=print):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

        self.config, self.log = config, log
        self.out = Path(config.output_dir)
        self.folder = RunFolder(self.out)
        check_writable_dir(self.out, "--output-dir")
        self.resumed_from = self._checkpoint_to_resume(resume)
        check_fsdp_has_cuda()
        self.accelerator = Accelerator(
            # without CUDA, processes started by `accelerate launch` (torchrun) join over gloo on the CPU
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision(config), log_with=trackers(config, log) or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.folder.logs)),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(config.stages) > 1)],
        )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise T2RError("t2r finetune does not run under DeepSpeed yet (it builds one optimizer per stage); "
                           "use DDP or FSDP in your accelerate config")
        set_seed(config.seed)
        self.precision = Precision(self.accelerator)
        # which loss path (loss.fused) runs here; a 'liger' that cannot run fails now, before any work
        self.fused, self._fused_why = resolve_fused(config.loss.fused, self.accelerator.device,
                                                    self.precision.sharded)
        self.compile, self._compile_why = resolve_compile(config.model.compile, self.accelerator.device,
                                                          self.precision.sharded, config.model.gradient_checkpointing)
        self.fused_layers, self._fused_layers_why = resolve_fused_layers(
            config.model.fused_layers, self.accelerator.device, self.precision.sharded, self.compile)
        self.state = read_trainer_state(self.resumed_from) if self.resumed_from is not None else TrainerState()
        self.metrics = MetricsFile(self.folder.metrics)
        self._stop_signal = 0

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        latest = latest_checkpoint(self.out)
        if latest is not None and not resume:
            raise T2RError(f"{self.out} already holds a run (checkpoint {latest.name}); pass --resume to continue it "
                           "or choose another --output-dir")
        if resume and latest is not None:
            latest = intact_checkpoint(self.out, self.log)
            if latest is None:
                raise T2RError(f"cannot resume {self.out}: every checkpoint in it is damaged (see the warnings); "
                               "start again in a new --output-dir")
        if resume and latest is None:
            raise T2RError(f"nothing to resume: {self.out} has no complete checkpoint")
        return latest

    def _main_log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self.log(msg)

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> Path:
        with run_lock(self.out, enabled=self.accelerator.is_main_process):
            return self._run()

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if self.resumed_from is None and acc.is_main_process:
            # a fresh run (no checkpoint here): nothing of an earlier attempt's logs carries over
            for stale in (self.folder.metrics, self.folder.summary):
                stale.unlink(missing_ok=True)
        self.setup()
        if self.resumed_from is None:
            if cfg.eval.teacher:
                self.evaluate("teacher_ppl", teacher=True)
            if cfg.eval.before:
                self.evaluate("converted_ppl_before")
        else:
            if acc.is_main_process:
                self.metrics.trim(self.state.step)  # the steps the checkpoint does not hold are done again
            self._main_log(f"resuming from {self.resumed_from.name} (step {self.state.step})")
        previous = self._signals()
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.folder.profile, acc.is_main_process)
        bar = tqdm(total=cfg.total_steps, initial=self.state.step, disable=not (acc.is_main_process and
                   cfg.logging.progress_bar), desc="t2r finetune", dynamic_ncols=True)
        try:
            while self.state.stage < len(cfg.stages):
                self._run_stage(cfg.stages[self.state.stage], bar)
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        self.evaluate("ppl_after")
        self.finish()
        acc.end_training()
        return self.out

    def _run_stage(self, stage, bar) -> None:
        cfg = self.config
        self._enter_stage(stage)
        while self.state.stage_step < stage.steps:
            self.profiler.before(self.state.step + 1)
            started, tokens_before = time.time(), self.state.tokens_seen
            stats = self.train_step(stage, self.optimizer)
            self.profiler.after(self.state.step)
            bar.update(1)
            self._log_step(stats, stage, self.state.tokens_seen - tokens_before, time.time() - started, bar)
            if self.state.step % cfg.eval.every_steps == 0 and self.state.stage_step < stage.steps:
                self.evaluate(f"ppl_step_{self.state.step}")
            if self.state.step % cfg.checkpoint.every_steps == 0:
                self._checkpoint()
            if self._should_stop():
                self._checkpoint()
                raise RunStopped(f"stopped by signal at step {self.state.step}; continue with --resume "
                                 f"(t2r finetune CONFIG --output-dir {self.out} --resume)", exit_code=130)
        if isinstance(stage, AttentionTransferStage):
            self.transfer_report("transfer_error_after")
        self.state.stage_summaries.append({"name": stage.name, "steps": stage.steps,
                                           "tokens": self.state.tokens_seen - self.state.stage_start_tokens,
                                           "lora": self.lora.model_dump() if self.lora and stage.name ==
                                           "finetune" and stage.lora else None})
        self.state.stage += 1
        self.state.stage_step = 0

    def _enter_stage(self, stage) -> None:
        """Train this stage's parameters; restore the checkpoint being resumed, or start the stage
        afresh (new optimizer moments; for attention transfer, the error before it)."""
        acc = self.accelerator
        self.precision.enter_stage(self.model, stage)
        if self.resumed_from is not None:
            try:
                acc.load_state(str(self.resumed_from / ACCELERATE_STATE))
            except (ValueError, KeyError) as e:  # e.g. an optimizer layout from another t2r version
                raise T2RError(f"cannot resume from {self.resumed_from}: its training state does not match "
                               f"this run ({e}); resume with the t2r version and config that wrote it, or "
                               "start again in a new --output-dir") from e
            self.resumed_from = None
        else:
            self.state.stage_start_tokens = self.state.tokens_seen
            self.optimizer.optimizer.state.clear()  # fresh moments for this stage
            if isinstance(stage, AttentionTransferStage) and "transfer_error_before" not in self.state.evals:
                self.transfer_report("transfer_error_before")

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        acc, cfg = self.accelerator, self.config
        saved = self.folder.config
        if self.resumed_from is not None and saved.is_file():
            changed = resume_mismatch(yaml.safe_load(saved.read_text()) or {}, cfg)
            if changed:
                raise T2RError(f"cannot resume {self.out}: {changed} differs from the run that wrote its checkpoints "
                               f"({saved}); resume with those settings (step counts, learning rates, evaluation and "
                               "checkpointing may change), or start again in a new --output-dir")
        with acc.main_process_first(), map_bars(cfg.logging.progress_bar):
            sources = load_sources(cfg.data)  # bad data fails before the model loads
            model, self.tokenizer = load_model(cfg.model, log=self._main_log)
        if acc.is_main_process:
            saved.write_text(dump_config(cfg))
        with acc.main_process_first(), map_bars(cfg.logging.progress_bar):
            cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.folder.cache
            train_rows, eval_rows = packed_rows(sources, self.tokenizer, cache, cfg.seed)
            self.order = RowOrder(train_rows, cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        n_eval = (cfg.eval.max_batches or 10**9) * cfg.batch.micro_batch_size * acc.num_processes
        self.eval_rows = list(eval_rows.take(n_eval) if not hasattr(eval_rows, "__len__")
                              else eval_rows.select(range(min(n_eval, len(eval_rows))))) if eval_rows else []
        self.lora = run_lora_config(cfg.stages)
        if any(isinstance(s, FinetuneStage) for s in cfg.stages):
            compiled = ", compiled" if self.fused == "chunked" and self.compile else ""
            self._main_log(f"finetune losses: {self.fused}{compiled} ({self._fused_why})")
        full_kl = any(isinstance(s, FinetuneStage) and s.lora is None and s.kl_weight > 0 for s in cfg.stages)
        self.teacher = frozen_teacher(model).to(acc.device) if full_kl else None
        if self.fused_layers == "liger":
            counts = use_fused_layers(model)
            if self.teacher is not None:
                use_fused_layers(self.teacher)
            self._main_log(f"fused layers: liger-kernel's RMSNorm ({counts['RMSNorm']}) and SwiGLU "
                           f"({counts['SwiGLU']}) ({self._fused_layers_why})")
        else:
            self._main_log(f"fused layers: off, torch RMSNorm and SwiGLU ({self._fused_layers_why})")
        if self.lora is not None:
            if acc.is_main_process and self.resumed_from is None:
                save_model_folder(model, self.tokenizer, self.folder.base)  # what the adapter goes on top of
            model = add_lora(model, self.lora)
        self.precision.prepare_parameters(model, cfg.stages)
        if cfg.model.gradient_checkpointing:
            with warnings.catch_warnings():  # newer transformers renamed it (activation_checkpointing_enable), not
                # in all the versions t2r supports: the old name, without its FutureWarning at every run
                warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.compile:
            n = compile_layers(model)
            teacher = f" and the teacher's {compile_layers(self.teacher)}" if self.teacher is not None else ""
            self._main_log(f"compiled layers: the model's {n} decoder layers{teacher}, torch.compile "
                           f"({self._compile_why})")
        else:
            self._main_log(f"compiled layers: none ({self._compile_why})")
        model.train()
        # One optimizer for the whole run, prepared together with the model (FSDP2 needs both at
        # once). A stage's frozen parameters get no gradient, so AdamW leaves them alone, and each
        # stage starts from fresh moments (_enter_stage): the same updates as one optimizer per stage.
        o = cfg.optimizer
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.stages[0].lr,
                                      betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if acc.log_with:
            acc.init_trackers("t2r", config=tracker_config(cfg, self.out))

    # -- one optimizer step -----------------------------------------------------------------------
    def _my_batches(self) -> list[dict]:
        cfg, acc = self.config, self.accelerator
        micro, accum, world = cfg.batch.micro_batch_size, cfg.batch.grad_accum, acc.num_processes
        rows = self.order.take(self.state.data_position, micro * accum * world)
        batches = []
        for a in range(accum):
            start = (a * world + acc.process_index) * micro
            batches.append({k: v.to(acc.device) for k, v in collate(rows[start:start + micro], self.pad_id).items()})
        return batches

    def train_step(self, stage, optimizer) -> dict:
        acc = self.accelerator
        with phase("data"):
            batches = self._my_batches()
        counts = torch.stack([count_targets(b, stage) for b in batches]).sum().float()
        global_tokens = acc.reduce(counts, reduction="sum")
        scale = acc.num_processes / global_tokens.clamp_min(1)
        totals: dict[str, torch.Tensor] = {}
        with self.precision.backward_scope(self.model, stage):
            self._accumulate(batches, stage, scale, totals)
        with phase("wait_for_gpu"):  # the first value the host reads back: it waits for the queued work
            stats = {k: (acc.reduce(v, reduction="sum") / global_tokens).item() for k, v in totals.items()}
        if not math.isfinite(stats["loss"]):
            raise RunStopped(self._nonfinite_message(stats["loss"]), exit_code=3)
        self.precision.drop_untrained_grads(self.model)
        lr = learning_rate(stage, self.state.stage_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with phase("optimizer"):
            if self.config.optimizer.grad_clip:
                # all parameters: the frozen ones have no gradient, and FSDP clips only over the whole model
                norm = acc.clip_grad_norm_(list(self.model.parameters()), self.config.optimizer.grad_clip)
                stats["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                if not math.isfinite(stats["grad_norm"]):
                    raise RunStopped(self._nonfinite_message(stats["grad_norm"], "gradient norm"), exit_code=3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        input_tokens = acc.reduce(torch.tensor(float(sum((b["labels"] != -100).sum() for b in batches)),
                                               device=acc.device), reduction="sum")
        self.state.step += 1
        self.state.stage_step += 1
        self.state.data_position += self.config.batch.micro_batch_size * self.config.batch.grad_accum \
            * acc.num_processes
        self.state.tokens_seen += int(input_tokens.item())
        stats["lr"] = lr
        return stats

    def _accumulate(self, batches, stage, scale, totals) -> None:
        """Forward and backward of each micro-batch, gradients synchronised on the last one."""
        acc = self.accelerator
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast(), lora_input_casts_off(self.model):
                loss_sum, parts = stage_loss_sum(self.model, batch, stage, self.teacher, self.fused,
                                                 self.config.loss.chunk_size, compiled=self.compile)
                with phase("backward"):
                    acc.backward(loss_sum * scale)
            for k, v in {"loss": loss_sum.detach(), **parts}.items():
                totals[k] = totals.get(k, 0) + v.float()

    def _nonfinite_message(self, value, what: str = "loss") -> str:
        latest = latest_checkpoint(self.out)
        where = (f"{what} became {value} at step {self.state.step + 1} (stage "
                 f"{self.config.stages[self.state.stage].name}); stopped before applying that update")
        if latest:
            return (f"{where}; the last good checkpoint is {latest}. Lower the learning rate or check the data, "
                    "then continue with --resume")
        return (f"{where}; no checkpoint was written yet, so there is nothing to resume: lower the learning rate "
                f"or check the data, then start again (delete {self.out} or choose another --output-dir)")

    # -- after a step: log, evaluate, checkpoint, stop ----------------------------------------------
    def _log_step(self, stats: dict, stage, step_tokens: int, seconds: float, bar) -> None:
        if self.accelerator.is_main_process:
            tps = step_tokens / max(seconds, 1e-9)
            self.metrics.append({"step": self.state.step, "stage": stage.name,
                                 **{k: round(v, 6) for k, v in stats.items()},
                                 "tokens": self.state.tokens_seen, "tokens_per_s": round(tps, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tps:,.0f}", stage=stage.name)
        if self.state.step % self.config.logging.every_steps == 0:
            self.accelerator.log({f"train/{k}": v for k, v in stats.items()}, step=self.state.step)

    def evaluate(self, key: str, teacher: bool = False) -> None:
        from ..eval.perplexity import perplexity

        if not self.eval_rows:
            return
        ppl, tokens = perplexity(self.model, self.eval_rows, self.config.batch.micro_batch_size, self.pad_id,
                                 self.accelerator.device, self.accelerator, teacher=teacher)
        self.state.evals[key] = ppl
        self.state.evals["eval_tokens"] = tokens
        self._main_log(f"held-out perplexity {key}: {ppl:.3f} ({tokens:,} tokens)")
        self.accelerator.log({f"eval/{key}": ppl}, step=self.state.step)

    @torch.no_grad()
    def transfer_report(self, key: str) -> None:
        """Each GSA layer's attention-transfer error (mean over held-out tokens of the per-token
        mean squared error of its output against the teacher's softmax attention) in evals[key]."""
        acc, core = self.accelerator, self.accelerator.unwrap_model(self.model)
        # the same number of rows on every process (sharded layers gather in step)
        per_process = min(len(self.eval_rows) // acc.num_processes, 4 * self.config.batch.micro_batch_size)
        if per_process == 0:
            return
        rows = self.eval_rows[acc.process_index::acc.num_processes][:per_process]
        sums, tokens = None, torch.zeros((), device=acc.device)
        for i in range(0, len(rows), self.config.batch.micro_batch_size):
            batch = {k: v.to(acc.device) for k, v in collate(rows[i:i + self.config.batch.micro_batch_size],
                                                             self.pad_id).items()}
            labels = batch.pop("labels")
            with acc.autocast():
                errs = core(**batch, attention_transfer=True).layer_errors.float()
            sums = errs if sums is None else sums + errs
            tokens += (labels != -100).sum()
        per_layer = acc.reduce(sums, reduction="sum") / acc.reduce(tokens, reduction="sum").clamp_min(1)
        self.state.evals[key] = [round(float(e), 6) for e in per_layer]
        self._main_log(f"attention-transfer error per GSA layer, {key}: mean {per_layer.mean().item():.4g}, "
                       f"max {per_layer.max().item():.4g}")

    def _checkpoint(self) -> None:
        try:
            full = self.precision.full_state_dict(self.model)
            path = save_checkpoint(self.accelerator, self.out, self.state, self.config.checkpoint.keep_last,
                                   extra=lambda folder: self._exportable(folder, full))
            self._main_log(f"checkpoint {path.name} saved")
        except OSError as e:
            latest = latest_checkpoint(self.out)
            self._main_log(f"warning: writing the checkpoint at step {self.state.step} failed ({e}); "
                           f"the previous one ({latest.name if latest else 'none'}) is intact; training goes on")

    def _exportable(self, folder: Path, full=None) -> None:
        """Make a checkpoint exportable (t2r export): the LoRA adapter (small; its base is OUTPUT/base),
        or, without LoRA, a model folder whose weights are a hard link to the checkpoint's own (under
        FSDP, whose checkpoint is sharded, a copy of the gathered weights)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.lora is not None:
            save_adapter(model, self.folder, folder / ADAPTER, state_dict=full)
        elif full is not None:
            save_model_folder(model, self.tokenizer, folder / MODEL, state_dict=self.precision.in_weights_dtype(full))
        else:
            link_checkpoint_model(model, self.tokenizer, folder)

    def _signals(self):
        def handler(signum, frame):
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _should_stop(self) -> bool:
        flag = torch.tensor(float(self._stop_signal), device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="max").item() > 0

    # -- outputs ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Write OUTPUT/model (merged), OUTPUT/adapter (with LoRA) and OUTPUT/run_summary.json."""
        acc = self.accelerator
        acc.wait_for_everyone()
        full = self.precision.full_state_dict(self.model)
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        if self.lora is not None:
            save_adapter(model, self.folder, self.folder.adapter, state_dict=full)
            model = model.merge_and_unload() if full is None else merged_from_folders(self.folder)
        if full is not None and self.lora is None:  # FSDP: the gathered weights
            save_model_folder(model, self.tokenizer, self.folder.model,
                              state_dict=self.precision.in_weights_dtype(full))
        else:
            self.precision.cast_back(model)  # trained (and under FSDP all) parameters are fp32 by now
            save_model_folder(model, self.tokenizer, self.folder.model)
        self.folder.summary.write_text(json.dumps(self._summary(model.config), indent=1))
        self.log(f"done: {self.folder.model} ({self.state.tokens_seen:,} tokens seen)")

    def _summary(self, c) -> dict:
        cfg = self.config
        return {
            "base_model": cfg.model.source, "base_model_type": c.base_model_type,
            "conversion": cfg.model.conversion.model_dump(), "gsa_layers": c.gsa_layers,
            "num_hidden_layers": c.num_hidden_layers, "tokens_seen": self.state.tokens_seen,
            "stages": self.state.stage_summaries,
            "eval": {k: self.state.evals.get(k) for k in ("teacher_ppl", "converted_ppl_before", "ppl_after",
                                                          "eval_tokens")},
            "transfer_error_per_layer": {k.removeprefix("transfer_error_"): self.state.evals[k]
                                         for k in ("transfer_error_before", "transfer_error_after")
                                         if k in self.state.evals},
            "license": ALIAS_LICENSES.get(cfg.model.source.lower()),
            "finetune_losses": self.fused,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available() else None,
            "train_tokens_per_s": self.metrics.median_tokens_per_s(s.name for s in cfg.stages),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }


def finetune(config: RunConfig, resume: bool = False, log=print) -> Path:
    return Run(config, resume, log).run()
