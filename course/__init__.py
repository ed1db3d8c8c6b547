"""Chapter 7's course layer: the code the book teaches, under its names.

Data and prompts (instruction_data), the collate drafts, fine-tuning (finetuning), the
exercises, LoRA, DPO, the local reference metrics and the notebooks' figures; and chapter 5's
pretraining (pretraining: the losses, the training loop, loading GPT-2's weights), which
chapter 7 reuses and ``previous_chapters`` serves under the book's names. It reads
like the book; the machinery it runs on lives in ``runtime``."""
