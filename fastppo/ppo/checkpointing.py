"""Saving and resuming a PPO run (`Checkpointing`, a part of PPOTrainer): the checkpoint (everything a resume needs,
bit for bit, with what tells on resume whether the prompts and the KL reference are the same), the model-only export,
and restoring the trainer's state from a checkpoint."""

from __future__ import annotations

import os

from fastppo.ppo.advantages import uses_critic
from fastppo.runtime import distributed, precision
from fastppo.runtime.checkpoint import (
    FINAL_MODEL,
    prune_checkpoints,
    save_checkpoint,
)
from fastppo.runtime.errors import InputError
from fastppo.runtime.export import export_model
from fastppo.runtime.fingerprints import prompts_digest, weights_digest
from fastppo.runtime.rng import rng_state, seed_everything, set_rng_state


class Checkpointing:
    def _fingerprints(self, policy, reference, prompts_source) -> dict:
        """What a checkpoint records to tell, on resume, whether the prompts and the KL reference are the same
        (`fingerprints.py`). The reference is policy_model's weights (or the `reference` path given); a model object
        has no files to digest and is not checked."""
        source = reference if reference is not None else policy
        path = os.path.abspath(source) if isinstance(source, str) else None
        where = prompts_source if isinstance(prompts_source, str) else "(the list given)"
        return {
            "prompts": {"count": len(self.prompts), "digest": prompts_digest(self.prompts), "source": where},
            "reference": {"path": path, "digest": weights_digest(path) if path else None},
        }

    def _resume_settings(self) -> dict:
        settings = resume_settings(self.config) | self.fingerprints
        if hasattr(self, "autocast_dtype"):  # what precision auto chose: a resume keeps it (SetUp._autocast_dtype)
            settings["computed_in"] = precision.computed_in(self.autocast_dtype)
        return settings

    def save(self, path: str | None = None) -> str:
        """A checkpoint of everything needed to resume, at <output_dir>/checkpoint-<step> (or under `path`).
        Under torchrun every rank calls it (the weights are gathered) and rank 0 writes it."""
        state = {
            "step": self.step_count,
            "optimizer": self.parallel.optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "sampler": self.sampler.state_dict(),
            "skipped_total": self.skipped_total,
            "rng": rng_state(),
        }
        if distributed.world_size() > 1:
            state["rng_per_rank"] = distributed.all_gather_objects(rng_state())
        with self.parallel.model_for_saving(self.model) as model:  # rank 0: the full weights; others: None
            saved = (
                None
                if model is None
                else save_checkpoint(
                    path or self.config.output_dir,
                    self.step_count,
                    model,
                    self.tokenizer,
                    state,
                    self.config.save_merged_lora,
                    self.save_dtype,
                    self._resume_settings(),
                )
            )
        if saved is not None and path is None and self.config.save_total_limit:
            prune_checkpoints(self.config.output_dir, self.config.save_total_limit, saved)
        return distributed.broadcast_object(saved)

    def save_model(self, path: str | None = None) -> str:
        """The final model at `path` (default <output_dir>/final): the policy alone, in the checkpoint's dtype, with
        its tokenizer, chat template and generation config, LoRA merged or as an adapter (save_merged_lora), that
        `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load (see `runtime.export`).
        `fastppo train` writes it at the end of a finished run. Under torchrun every rank calls it."""
        final = os.path.abspath(os.path.join(self.config.output_dir, FINAL_MODEL))
        path = os.path.abspath(path or final)
        taken = path not in (final, *self.exported) and os.path.isdir(path) and bool(os.listdir(path))
        if distributed.broadcast_object(taken):  # rank 0's view: every rank stops, none waits in the gathering
            raise InputError(f"save_model: {path} is not empty; name a new folder (nothing already there is replaced)")
        probes = [str(p) for p in self.prompts[:8]]
        with self.parallel.model_for_saving(self.model) as model:
            if model is not None:
                export_model(model.lm, self.tokenizer, path, self.config.save_merged_lora, self.save_dtype, probes)
        self.exported.add(path)
        return distributed.broadcast_object(path)

    def _resume(self, checkpoint: str, state: dict) -> int:
        """Restore the trainer `state` of `checkpoint`, whose weights were loaded before wrapping the model."""
        try:
            self.parallel.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as error:  # a checkpoint from before settings were recorded
            raise InputError(
                f"resume_from: the optimizer state of {checkpoint} does not fit this model ({error}): "
                "did critic, advantage_estimator or lora_rank change?"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if "kl_coef" in self.resume_changes:  # honoured (check_resume_settings said so)
            self.kl_controller.value = self.config.kl_coef
        self.score_moments.load_state_dict(state["score_moments"])
        if "seed" in self.resume_changes or "prompts" in self.resume_changes:  # a new epoch, in the new order
            self.sampler.epoch, self.sampler.position = state["sampler"]["epoch"] + 1, 0
        else:
            self.sampler.load_state_dict(state["sampler"])
        self.skipped_total = state.get("skipped_total", 0)
        set_rng_state(state["rng"])
        per_rank = state.get("rng_per_rank") or []
        new_world = distributed.world_size() > 1 and len(per_rank) != distributed.world_size()
        if "seed" in self.resume_changes or new_world:
            seed_everything(self.config.seed + distributed.rank() + 7919 * state["step"])  # new streams
        elif distributed.world_size() > 1:  # each rank its own stream, as saved
            set_rng_state(per_rank[distributed.rank()])
        self.step_count = state["step"]
        if distributed.is_main():
            print(f"fastppo: resumed from {checkpoint} at step {self.step_count}")
        return self.step_count


def resume_settings(config) -> dict:
    """The PPO settings `check_resume_settings` compares (JSON values); the trainer adds the digests of the prompts
    and of the reference's weights."""
    return {
        "critic": config.critic if uses_critic(config.advantage_estimator) else "none",
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha if config.lora_rank else None,  # the adapters' scale: another is another model
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "kl_coef": config.kl_coef,
        "adaptive_kl_target": config.adaptive_kl_target,
        "kl_horizon": config.kl_horizon,
        "seed": config.seed,
    }
