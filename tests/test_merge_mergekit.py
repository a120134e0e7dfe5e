"""labkit merge vs mergekit itself on the same YAML configs and the same tiny Llama checkpoints.

Skipped unless mergekit is importable (it is not a labkit dependency). Checked by hand against
mergekit 0.1.5: every deterministic method agrees to float32 rounding (DARE's random drops use a
different random stream, so only density 1 is compared)."""
import json

import pytest
import torch

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from labkit.merge import run_merge_config  # noqa: E402
from test_merge_io import read_dir, write_config, zoo  # noqa: E402,F401  (zoo is a fixture)

W = lambda **p: p  # noqa: E731
CONFIGS = {
    "linear": dict(merge_method="linear", models=[dict(model="ft0", parameters=W(weight=0.6)),
                                                  dict(model="ft1", parameters=W(weight=0.2)),
                                                  dict(model="ft2", parameters=W(weight=0.4))]),
    "linear_unnormalized": dict(merge_method="linear", parameters=W(normalize=False),
                                models=[dict(model="ft0", parameters=W(weight=0.6)),
                                        dict(model="ft1", parameters=W(weight=0.2))]),
    "slerp_gradients": dict(merge_method="slerp", base_model="ft0", models=[dict(model="ft0"), dict(model="ft1")],
                            parameters=W(t=[dict(filter="self_attn", value=[0, 0.5, 1]), dict(filter="mlp", value=[1, 0.3]),
                                            dict(value=0.4)])),
    "task_arithmetic": dict(merge_method="task_arithmetic", base_model="base", parameters={"lambda": 0.7},
                            models=[dict(model="ft0", parameters=W(weight=1.0)), dict(model="ft1", parameters=W(weight=-0.5))]),
    "task_arithmetic_normalized": dict(merge_method="task_arithmetic", base_model="base", parameters=W(normalize=True),
                                       models=[dict(model="ft0", parameters=W(weight=0.3)),
                                               dict(model="ft1", parameters=W(weight=0.5))]),
    "ties": dict(merge_method="ties", base_model="base", parameters={"lambda": 0.8},
                 models=[dict(model="ft0", parameters=W(weight=0.7, density=0.5)),
                         dict(model="ft1", parameters=W(weight=0.3, density=[0.2, 0.9])),
                         dict(model="ft2", parameters=W(weight=0.5, density=0.3))]),
    "ties_rescaled_unnormalized": dict(merge_method="ties", base_model="base", parameters=W(normalize=False, rescale=True),
                                       models=[dict(model="ft0", parameters=W(weight=1, density=0.4)),
                                               dict(model="ft1", parameters=W(weight=1, density=0.6))]),
    "breadcrumbs": dict(merge_method="breadcrumbs", base_model="base",
                        models=[dict(model="ft0", parameters=W(weight=1, density=0.6, gamma=0.05)),
                                dict(model="ft1", parameters=W(weight=0.5, density=0.8))]),
    "breadcrumbs_ties": dict(merge_method="breadcrumbs_ties", base_model="base",
                             models=[dict(model="ft0", parameters=W(weight=1, density=0.6, gamma=0.05)),
                                     dict(model="ft1", parameters=W(weight=0.5, density=0.8, gamma=0.1))]),
    "model_stock": dict(merge_method="model_stock", base_model="base",
                        models=[dict(model="ft0"), dict(model="ft1"), dict(model="ft2")]),
    "model_stock_filter_wise": dict(merge_method="model_stock", base_model="base", parameters=W(filter_wise=True),
                                    models=[dict(model="ft0"), dict(model="ft1"), dict(model="ft2")]),
    "dare_ties_density_1": dict(merge_method="dare_ties", base_model="base",
                                models=[dict(model="ft0", parameters=W(weight=1, density=1.0)),
                                        dict(model="ft1", parameters=W(weight=0.5))]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit(zoo, tmp_path, name):  # noqa: F811
    path = write_config(tmp_path / "m.yml", zoo, dtype="float32", **json.loads(json.dumps(CONFIGS[name])))
    import yaml

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(tmp_path / "mergekit"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    ours, theirs = read_dir(run_merge_config(path, tmp_path / "labkit", verbose=False)), read_dir(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), (k, (ours[k] - theirs[k]).abs().max())
