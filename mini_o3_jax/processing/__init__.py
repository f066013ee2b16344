"""Host-side processing: images (== Qwen2VLImageProcessor), tokenizers, chat template."""

from mini_o3_jax.processing.chat import count_images
from mini_o3_jax.processing.chat import render_chat
from mini_o3_jax.processing.chat import tokenize_conversation
from mini_o3_jax.processing.image import load_image
from mini_o3_jax.processing.image import num_image_tokens
from mini_o3_jax.processing.image import preprocess_image
from mini_o3_jax.processing.image import smart_resize
from mini_o3_jax.processing.tokenizer import build_qwen_tokenizer
from mini_o3_jax.processing.tokenizer import build_small_tokenizer
from mini_o3_jax.processing.tokenizer import load_tokenizer
from mini_o3_jax.processing.tokenizer import QWEN25VL_CHAT_TEMPLATE
from mini_o3_jax.processing.tokenizer import special_token_ids

__all__ = [
    "QWEN25VL_CHAT_TEMPLATE",
    "build_qwen_tokenizer",
    "build_small_tokenizer",
    "count_images",
    "load_image",
    "load_tokenizer",
    "num_image_tokens",
    "preprocess_image",
    "render_chat",
    "smart_resize",
    "special_token_ids",
    "tokenize_conversation",
]
