"""Checkpoint files: what a loaded one may contain (:mod:`.guard`), reading one with only that
unpickled (:mod:`.read`), and writing them kill-safe and finding an intact one to resume from
(:mod:`.files`). Nothing here changes fairseq; the plugin wires these into fairseq in
:mod:`fairseq_longmem.fairseq_patches`."""
