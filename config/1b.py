"""The real recipe: a ~1.0B-parameter bilingual model, DDP on 8 GPUs with 80 GB each.

    torchrun --nproc_per_node=8 pretrain.py config/1b.py

Shape follows the Llama/TinyLlama family at this size: dim 2048, 20 layers, 16 query heads sharing
8 key/value heads (GQA halves the KV cache), SwiGLU hidden 8/3*dim rounded to a multiple of 64
(5504), a 32768-entry bilingual SentencePiece vocabulary with tied embeddings. About 0.99B
parameters (tests/test_model.py counts them on the meta device).
"""
# model (see model.ModelConfig)
vocab_size = 32768
dim = 2048
n_layers = 20
n_heads = 16
n_kv_heads = 8
max_seq_len = 2048
rope_theta = 10000.0
tie_embeddings = True
dropout = 0.0
