"""Test-time adaptation parts: view generation, confidence selection and the entropy objective."""

from vlprompt.tta.views import TestTimeViews, confident_views, marginal_entropy

__all__ = ["TestTimeViews", "confident_views", "marginal_entropy"]
