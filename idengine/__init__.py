"""idengine: species identification from DNA barcodes with a LoRA-tuned nucleotide transformer on Ray."""

__version__ = "0.1.0"
