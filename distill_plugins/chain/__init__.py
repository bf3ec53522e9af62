"""Teacher-assistant chains (TAKD): teacher -> assistant(s) -> student as one resumable run.

TAKD (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant"; the LLM
replication in ``../shared/specs/methods.md`` section 4) distills a large teacher into a mid-sized
assistant, then the assistant into the student. ``distill-chain chain.yaml`` runs such a chain of
``fairseq-train`` stages: each stage's selected checkpoint becomes the ``--teacher-path`` of the
stages that name it as their teacher.

* ``config``: the chain file (YAML or JSON), validated into ``ChainConfig``/``StageSpec``.
* ``command``: one stage -> its exact ``fairseq-train`` command line and settings.
* ``inspect``: what fairseq says about a stage's arguments (accepted? how many parameters?).
* ``manifest``: the chain's record (``manifest.json``, written atomically) and file hashing.
* ``plan``: which stages to skip, resume or (re)train, and why.
* ``runner``: runs the plan, with progress output, and records the results.
"""
