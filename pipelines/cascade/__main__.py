"""`python -m pipelines.cascade FLAGS`."""
from pipelines.cascade.job import main

main()
