"""Many trainings as one Ray Tune experiment: hyperparameter campaigns and grids of named trials.

    spec.py      a campaign YAML -> CampaignSpec, checked without starting Ray
    run.py       the runner: a Tuner (or Tuner.restore) over trials that each fit the same
                 TorchTrainer as `fvae-dist train`
    campaign.py  `fvae-dist tune`: Optuna's TPE proposes, Tune's ASHAScheduler stops
    grid.py      run_grid: a fixed set of named train configs (the robustness job, `reproduce`)
    results.py   a campaign's results.csv/.md, best_config.yaml, summary.json
"""
from fvae_dist.tune.campaign import CampaignOutcome, concurrent_trials, optuna_space, run_campaign
from fvae_dist.tune.grid import GridOutcome, GridTrial, run_grid
from fvae_dist.tune.results import TrialRow, sort_rows, write_results
from fvae_dist.tune.run import Experiment, TrialPlan, experiment_dir, run_experiment
from fvae_dist.tune.spec import EPOCHS_DONE, CampaignSpec, ParamSpec, campaign_from_dict, load_campaign, reported_metrics

__all__ = [
    "EPOCHS_DONE", "CampaignOutcome", "CampaignSpec", "Experiment", "GridOutcome", "GridTrial", "ParamSpec",
    "TrialPlan", "TrialRow", "campaign_from_dict", "concurrent_trials", "experiment_dir", "load_campaign",
    "optuna_space", "reported_metrics", "run_campaign", "run_experiment", "run_grid", "sort_rows", "write_results",
]
