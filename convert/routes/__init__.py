"""The routes a family's output takes when its own transformers class cannot hold G KV heads.

reexpress/   read a classic MHA checkpoint as a stock class with a KV-head count (phi, nemotron, gpt_bigcode)
shipped.py   write modeling code beside the weights (the templates in modeling/, copied verbatim)
"""
