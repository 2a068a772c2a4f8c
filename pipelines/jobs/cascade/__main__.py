"""`python -m pipelines.jobs.cascade FLAGS`."""
from pipelines.jobs.cascade.driver import main

main()
