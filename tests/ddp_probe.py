"""train_dit.py, plus a record of what each process saw: tests/test_multiprocess.py launches it with accelerate.

Writes output_dir/rank_facts/rank-<r>.json: the process's rank, world size, distributed type, steps, a hash of
every clip it trained on and a fingerprint of its final weights.
"""

import hashlib
import json

from nanoi2v_diffusers.data.latent_cache import model_fingerprint
from nanoi2v_diffusers.training.train_dit import DiTTrainer

FACTS_DIR = "rank_facts"


class ProbedDiTTrainer(DiTTrainer):
    def compute_loss(self, batch, generator):
        seen = self.__dict__.setdefault("clip_hashes", [])
        seen += [hashlib.sha256(latents.float().cpu().numpy().tobytes()).hexdigest()[:16]
                 for latents in batch["posterior_mean"]]  # fmt: skip
        return super().compute_loss(batch, generator)

    def export_outputs(self, summary):
        super().export_outputs(summary)
        accelerator = self.accelerator
        facts = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                 "distributed_type": str(accelerator.distributed_type), "steps": self.state.step,
                 "clip_hashes": self.clip_hashes,
                 "parameter_fingerprint": model_fingerprint(accelerator.unwrap_model(self.model))}  # fmt: skip
        path = self.output_dir / FACTS_DIR / f"rank-{accelerator.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=1), encoding="utf-8")


if __name__ == "__main__":
    ProbedDiTTrainer.main()
