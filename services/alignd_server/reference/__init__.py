"""ReferenceService: log-probabilities under a frozen reference policy."""
