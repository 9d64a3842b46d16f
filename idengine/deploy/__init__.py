"""Deploy: the exported artifact, how it is written, loaded and run over a FASTA of any size."""
