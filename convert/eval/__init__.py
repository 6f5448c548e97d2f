"""`gqa-convert eval`: quality against KV-cache memory and decode speed.

common.py      what every evaluation shares: the result types, tokenizer and text, memory and decode timing
causal.py      decoder-only models: perplexity and decode
seq2seq.py     encoder-decoder models (T5): span-corruption loss and decode
perplexity.py  perplexity on fixed token windows
compare.py     several models side by side: dispatch, table, JSON
"""
