"""Storage shared by the API and the workers: the database, the artifact store and the profile cache."""
