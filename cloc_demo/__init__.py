"""The main job: the ``make demo*`` orchestration (synthetic data -> CLOC and CLIP pretraining ->
evaluation -> report, pictures and model card). It sits on top of every other package and nothing
imports it."""
