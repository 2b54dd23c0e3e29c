"""The distributed loops, written once: parameter server (actor-learner) and data-parallel."""
