"""RewardService: scores (prompt, response) pairs with reward models and function scorers."""
