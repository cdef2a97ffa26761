"""Task data and task metrics for fine-tuning M2M (Sec. 6.2, 7.1.2, 8.5): novel view synthesis on
Objaverse renders and visual procedure generation on VGSI, each with a procedural stand-in in the same
on-disk layout so every held-out image has ground truth. A library: no orchestration imports."""

from m2m_pipeline.tasks.cameras import camera_condition, flatten_extrinsics, relative_extrinsics
from m2m_pipeline.tasks.errors import MetricWeightsNotFoundError, TaskDataError
from m2m_pipeline.tasks.folders import write_objaverse_fixture, write_vgsi_fixture
from m2m_pipeline.tasks.objaverse import ObjaverseViews, list_objects, split_uids
from m2m_pipeline.tasks.vgsi import ProcedureSteps, list_procedures

__all__ = [
    "MetricWeightsNotFoundError", "ObjaverseViews", "ProcedureSteps", "TaskDataError", "camera_condition",
    "flatten_extrinsics", "list_objects", "list_procedures", "relative_extrinsics", "split_uids",
    "write_objaverse_fixture", "write_vgsi_fixture",
]
