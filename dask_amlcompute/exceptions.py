"""Exception types raised by dask-amlcompute.

Every error names the cause and what to do about it. Errors raised before a
job is submitted are subclasses of :class:`ValueError` (bad input) or
:class:`AmlComputeError` (the workspace says no); errors about a submitted job
carry the job's name, status, studio URL and the tail of its node logs.
"""


class AmlComputeError(Exception):
    """Base class of every dask-amlcompute error."""


class ConfigurationError(AmlComputeError, ValueError):
    """An argument or config value is invalid; nothing was submitted."""


class EnvironmentNotFoundError(ConfigurationError, LookupError):
    """The ``environment`` setting names no registered environment (the message lists some)."""


class WorkspaceNotConfiguredError(AmlComputeError):
    """No ``MLClient`` was given and no workspace config file was found."""


class AccessDeniedError(AmlComputeError, PermissionError):
    """AML refused the credential or the request (401/403): sign in again or ask for a role."""


class ControlPlaneError(AmlComputeError, ConnectionError):
    """The AML control plane kept failing (throttling, 5xx, network) after bounded retries."""


class ComputeNotFoundError(AmlComputeError, LookupError):
    """The named compute target does not exist in the workspace."""


class NotAmlComputeError(AmlComputeError, TypeError):
    """The compute target exists but is not an AmlCompute cluster."""


class TooManyNodesError(AmlComputeError, ValueError):
    """More nodes were asked for than the compute can ever provide."""


class QuotaExceededError(AmlComputeError, ValueError):
    """The request needs more vCPUs than the region's quota allows: it could never start."""


class JobError(AmlComputeError):
    """A submitted AML job did not do what was expected; the message says what to do.

    Attributes
    ----------
    job_name, status, studio_url, log_tail
        The AML job, the last status AML reported, its link in Azure ML studio and the
        last lines of its node logs (None where unknown); the message shows them too.
    exit_code
        On :func:`~dask_amlcompute.submit_script`'s errors: the script's exit code
        (None if it did not finish).
    """

    exit_code: int | None  # only on submit_script's errors

    def __init__(
        self,
        message: str,
        *,
        job_name: str | None = None,
        status: str | None = None,
        studio_url: str | None = None,
        log_tail: str | None = None,
    ) -> None:
        self.job_name = job_name
        self.status = status
        self.studio_url = studio_url
        self.log_tail = log_tail
        parts = [message, job_name and f"AML job: {job_name} (status: {status or 'unknown'})",
                 studio_url and f"Studio: {studio_url}",
                 log_tail and f"Tail of the node logs:\n{log_tail}"]  # fmt: skip
        super().__init__("\n".join(part for part in parts if part))


class JobFailedError(JobError):
    """The job ended Failed (a node exited non-zero, the environment failed, ...)."""


class EnvironmentBuildError(JobFailedError):
    """AML could not build the job's environment image (the job ended Failed).

    Attributes
    ----------
    requirements
        The requirements the build log names as uninstallable (maybe none).
    """

    requirements: list[str]


class JobCanceledError(JobError):
    """The job was canceled (by a user, by the job timeout, or by AML)."""


class StartupTimeoutError(JobError, TimeoutError):
    """The scheduler did not publish its address within ``startup_timeout``."""


class SchedulerUnreachableError(AmlComputeError, ConnectionError):
    """The scheduler published an address the client cannot connect to."""


class ClusterLostError(AmlComputeError, ConnectionError):
    """The cluster's scheduler is gone for good: its job ended, or AML ran it again.

    After a preemption AML may run the main job again: a new scheduler without the
    old one's workers or data. The cluster cancels its jobs and raises this from then on.
    """


class VersionMismatchError(AmlComputeError):
    """Client and cluster run different versions of packages that must match.

    Attributes
    ----------
    differences
        The :class:`~dask_amlcompute.backend.versions.Difference` of each package.
    """

    differences: list  # of backend.versions.Difference (this module imports none of ours)


class ErrorThresholdExceededError(AmlComputeError):
    """More inputs of a batch run failed than ``error_threshold`` allows; the run stopped.

    Nothing that completed is lost: it travels with the exception. Batches still
    running were cancelled.

    Parameters
    ----------
    results, errors
        Completed results and per-item errors (:class:`~dask_amlcompute.batch.ItemError`)
        by input position: all of them from :func:`~dask_amlcompute.batch.map_batches`,
        those not yet yielded from :func:`~dask_amlcompute.batch.iter_batches`.
    stats
        The run's counters (:class:`~dask_amlcompute.batch.BatchStats`).
    files
        Files already written under ``output_dir``, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        results: dict | None = None,
        errors: dict | None = None,
        stats: object = None,
        files: list | None = None,
    ) -> None:
        self.results = dict(results or {})
        self.errors = dict(errors or {})
        self.stats = stats
        self.files = list(files or [])
        super().__init__(message)


# -- the SSH tunnel to the scheduler (connect/) ------------------------------------


class TunnelError(AmlComputeError, ConnectionError):
    """The SSH tunnel to the scheduler's node could not be opened or kept open."""


class TunnelUnreachableError(TunnelError):
    """The node's SSH endpoint refused the connection or did not answer in time."""


class TunnelAuthenticationError(TunnelError):
    """The node's SSH server accepted none of the client keys."""


class HostKeyError(TunnelError):
    """The node's SSH host key is unknown or does not match ``known_hosts``."""


class ForwardingError(TunnelError):
    """The SSH server refused to forward to a target address."""
