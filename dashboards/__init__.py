"""Reading results: optuna-dashboard with the platform's plots, and reports for a paper draft.

``dashboards.serve`` (command line) runs optuna-dashboard on the study storage and keeps the plots of
``dashboards.plots`` and the per-trial files of ``dashboards.artifacts`` current; ``dashboards.report``
(command line) writes PNG figures and an HTML page, with ``dashboards.paper`` setting the ablation studies
beside the SE paper. ``dashboards.results`` computes what both draw, from ``search.export``'s table.
Modules are imported on use, so ``import dashboards`` stays cheap.
"""
