"""Chapter 7's course layer: the code the book teaches, under its names.

Data and prompts (instruction_data), the collate drafts, fine-tuning (finetuning), the
exercises, LoRA, DPO, the local reference metrics and the notebooks' figures. It reads
like the book; the machinery it runs on lives in ``runtime``."""
