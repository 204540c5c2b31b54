"""Training data for LLaVA-UHD: LLaVA-format JSON/JSONL and `datasets` in messages form, as rows and batches for TRL's
`SFTTrainer`. Used from a checkout (not installed)."""

from .collator import PLAIN_CHAT_TEMPLATE, LlavaUhdDataCollator, make_collator, open_image, training_chat_template
from .llava_format import BadRowError, convert_llava_row, load_llava_dataset, load_messages_dataset

__all__ = [
    "PLAIN_CHAT_TEMPLATE",
    "BadRowError",
    "LlavaUhdDataCollator",
    "convert_llava_row",
    "load_llava_dataset",
    "load_messages_dataset",
    "make_collator",
    "open_image",
    "training_chat_template",
]
