# Inputs of the spotguard image build. Set them with -var, -var-file or PKR_VAR_<name>.

# --- what to install --------------------------------------------------------------------------------

variable "spotguard_wheel" {
  type        = string
  default     = ""
  description = "Local path of a spotguard wheel to install (built with `pip wheel .`); empty = use spotguard_version."
}

variable "spotguard_version" {
  type        = string
  default     = "0.1.0"
  description = "spotguard version installed from pip_index_url when spotguard_wheel is empty."
}

variable "pip_index_url" {
  type        = string
  default     = ""
  description = "Package index for spotguard and its dependencies (a private index that hosts spotguard); empty = pip's default."
}

variable "spotguard_extras" {
  type        = string
  default     = "aws"
  description = "pip extras of spotguard (aws = boto3 for ELBv2 deregistration and ASG lifecycle hooks)."
}

variable "inference_unit" {
  type        = string
  default     = "vllm.service"
  description = "systemd unit of the inference server; spotguard is ordered after it so it stops (and drains) first."

  validation {
    condition     = can(regex("^[A-Za-z0-9:_.@-]+$", var.inference_unit))
    error_message = "The inference_unit must be a systemd unit name such as vllm.service."
  }
}

variable "config_file" {
  type        = string
  default     = ""
  description = "Local spotguard.toml installed as /etc/spotguard/spotguard.toml; empty = a commented default."
}

variable "image_name" {
  type        = string
  default     = "spotguard-gpu"
  description = "Prefix of the image name; a timestamp is appended."
}

# --- AWS ------------------------------------------------------------------------------------------

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "aws_instance_type" {
  type        = string
  default     = "g5.xlarge"
  description = "Build instance; a GPU type so the NVIDIA driver in the source AMI can be checked."
}

# The three default source images run Ubuntu 22.04, whose python3 is 3.10 (the AWS Deep Learning AMI
# release notes give python_location /usr/bin/python3.10 for the Ubuntu 22.04 Base OSS AMIs; the GCP
# family name ends in py310; the Azure ubuntu-hpc 2204 image is Ubuntu 22.04). spotguard needs 3.11+, so
# install-spotguard.sh installs python3.11 and python3.11-venv from Ubuntu's archive (universe) there.
# An image with Python 3.11+ skips that step, e.g. "Deep Learning Base OSS Nvidia Driver GPU AMI
# (Ubuntu 24.04) *" (python3.12 per its release notes).
variable "aws_source_ami_name" {
  type        = string
  default     = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
  description = "Name filter of the source AMI (one with the NVIDIA driver and the inference server)."
}

variable "aws_source_ami_owner" {
  type    = string
  default = "amazon"
}

variable "aws_ssh_username" {
  type    = string
  default = "ubuntu"
}

# --- Google Cloud -----------------------------------------------------------------------------------

variable "gcp_project_id" {
  type    = string
  default = ""
}

variable "gcp_zone" {
  type    = string
  default = "us-central1-a"
}

variable "gcp_machine_type" {
  type    = string
  default = "g2-standard-4"
}

variable "gcp_source_image_family" {
  type    = string
  default = "common-cu123-ubuntu-2204-py310"
}

variable "gcp_source_image_project_id" {
  type    = list(string)
  default = ["deeplearning-platform-release"]
}

# --- Azure ------------------------------------------------------------------------------------------

variable "azure_subscription_id" {
  type    = string
  default = ""
}

variable "azure_resource_group" {
  type        = string
  default     = ""
  description = "Resource group that receives the managed image."
}

variable "azure_location" {
  type    = string
  default = "eastus"
}

variable "azure_vm_size" {
  type    = string
  default = "Standard_NC4as_T4_v3"
}

variable "azure_image_publisher" {
  type    = string
  default = "microsoft-dsvm"
}

variable "azure_image_offer" {
  type    = string
  default = "ubuntu-hpc"
}

variable "azure_image_sku" {
  type    = string
  default = "2204"
}
