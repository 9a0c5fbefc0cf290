"""Real peers for the tests: the Medplum FHIR R4 server and an HTTP fault proxy."""
