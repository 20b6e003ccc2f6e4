"""Frozen-encoder evaluation: attentive / linear / k-NN probes, feature cache, metrics, demo.

    python -m ivfast.eval --config demo                      # after `python -m ivfast.train`
    python -m ivfast.eval protocol=vjepa dataset=ssv2 checkpoint=RUN/checkpoints/step_X \
        train_list=train.csv val_list=val.csv
    torchrun --nproc_per_node 8 -m ivfast.eval protocol=ivnext ...

Protocols and their sources: :mod:`ivfast.eval.config`. Python: :func:`ivfast.eval.run.run_protocol`.
"""
