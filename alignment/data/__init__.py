"""The data room: rows and their sources, shapes, the one tokenization path, and what each stage trains on.

- sources: reading files, hub datasets and built-in names into rows that know their origin (file:line);
- report: counting every row read, kept, truncated or dropped;
- shapes: the fields of each row shape, checked;
- text: how a conversation becomes token ids, for every stage, scorer and generator;
- sft, preference, prompts: SFT examples, preference pairs, RL prompts;
- layout: the rows a forward pass reads (padding, packing, shared prefixes);
- sampler: which examples each optimizer step takes.
"""
