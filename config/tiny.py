"""Tiny model for a laptop CPU: a few million parameters, trains on the demo world in minutes.

    python pretrain.py config/tiny.py
"""
# model (see model.ModelConfig)
vocab_size = 4096
dim = 256
n_layers = 4
n_heads = 8
n_kv_heads = 4
max_seq_len = 256
rope_theta = 10000.0
tie_embeddings = True
dropout = 0.0
