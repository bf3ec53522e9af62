from .instruction_jsonl import read_instruction_jsonl, render_prompt  # noqa: F401
from .prompt_response_dataset import PromptResponseDataset  # noqa: F401
