"""A/B tests of profiles: assignment, feedback, statistics and the stored offline comparison."""
