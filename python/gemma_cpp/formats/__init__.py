"""File formats, read and written without knowing any model: GGUF (a bounded reader and exact
numpy dequantization of its block types) and safetensors (zero-copy views of one memory map,
a streaming writer). The tokenizer and the loading layer both read files through them."""
