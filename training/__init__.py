"""`loramux train`: fit a PEFT LoRA adapter on the server's base model, on CPU.

config.py    TrainConfig (the validated flags) and TrainingError
data.py      JSONL rows -> chat turns -> (input ids, labels) through the server's own chat template
trainer.py   the loop (AdamW, warmup + cosine decay, clipping) and the saved PEFT directory

The adapter is trained on exactly the ids `loramux serve` feeds the model for the same chat
(server.prompts.chat_prompt_ids), and it stops where the served model stops (an EOS id of the
model, server.model.loader.eos_token_ids). torch, transformers and PEFT are imported inside the
functions that need them. This package knows nothing of flags (server/cli.py parses them) or of
the engine.
"""

from training.config import TrainConfig, TrainingError

__all__ = ["TrainConfig", "TrainingError"]
