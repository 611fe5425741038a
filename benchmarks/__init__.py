"""bam-bench: timings of bam's ops and models against their references and peers."""
