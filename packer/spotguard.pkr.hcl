# Bakes spotguard into GPU VM images on AWS, Google Cloud and Azure.
#
#   packer init packer/
#   packer build -var spotguard_wheel=dist/spotguard-0.1.0-py3-none-any.whl \
#                -var inference_unit=vllm.service -var gcp_project_id=... packer/
#
# Needs Packer >= 1.7 (required_plugins); Debian's packer 1.6.6 cannot read this block.
# The source images are expected to carry the NVIDIA driver and the inference server's unit.

packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
    googlecompute = {
      source  = "github.com/hashicorp/googlecompute"
      version = ">= 1.1.0"
    }
    azure = {
      source  = "github.com/hashicorp/azure"
      version = ">= 2.0.0"
    }
  }
}

locals {
  timestamp  = regex_replace(timestamp(), "[- TZ:]", "")
  image_name = "${var.image_name}-${local.timestamp}"
  staging    = "/tmp/spotguard"
  # Uploaded next to the install script; optional files drop out when their variable is empty. The
  # systemd directory carries both units, spotguard.service and spotguard-gate.service (the gate is its
  # own unit so that restarting spotguard never cuts a request in flight), with their drop-ins; the
  # install script installs and enables the pair, ordered after var.inference_unit.
  uploads = compact([
    "${path.root}/scripts/install-spotguard.sh",
    "${path.root}/../systemd",
    var.spotguard_wheel,
    var.config_file,
  ])
  install_args = join(" ", compact([
    var.spotguard_wheel != "" ? "--wheel ${local.staging}/${basename(var.spotguard_wheel)}" : "--version ${var.spotguard_version}",
    var.spotguard_extras != "" ? "--extras ${var.spotguard_extras}" : "",
    var.pip_index_url != "" ? "--pip-arg --index-url=${var.pip_index_url}" : "",
    "--inference-unit ${var.inference_unit}",
    var.config_file != "" ? "--config ${local.staging}/${basename(var.config_file)}" : "",
  ]))
}

source "amazon-ebs" "gpu" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ssh_username  = var.aws_ssh_username
  ami_name      = local.image_name
  source_ami_filter {
    filters = {
      name                = var.aws_source_ami_name
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.aws_source_ami_owner]
    most_recent = true
  }
  # IMDSv2 only on the build instance too: spotguard itself speaks v2 ([aws] imds_version).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"
  tags = {
    Name      = local.image_name
    spotguard = var.spotguard_wheel != "" ? basename(var.spotguard_wheel) : var.spotguard_version
  }
}

source "googlecompute" "gpu" {
  project_id              = var.gcp_project_id
  zone                    = var.gcp_zone
  machine_type            = var.gcp_machine_type
  source_image_family     = var.gcp_source_image_family
  source_image_project_id = var.gcp_source_image_project_id
  ssh_username            = "packer"
  image_name              = local.image_name
  image_family            = var.image_name
  disk_size               = 100
  # GPU VMs cannot live-migrate; the build VM needs this as well when it carries a GPU.
  on_host_maintenance = "TERMINATE"
  image_labels = {
    spotguard = replace(var.spotguard_version, ".", "-")
  }
}

source "azure-arm" "gpu" {
  use_azure_cli_auth                = true
  subscription_id                   = var.azure_subscription_id
  location                          = var.azure_location
  vm_size                           = var.azure_vm_size
  os_type                           = "Linux"
  image_publisher                   = var.azure_image_publisher
  image_offer                       = var.azure_image_offer
  image_sku                         = var.azure_image_sku
  managed_image_name                = local.image_name
  managed_image_resource_group_name = var.azure_resource_group
  azure_tags = {
    spotguard = var.spotguard_version
  }
}

build {
  name = "spotguard"
  sources = [
    "source.amazon-ebs.gpu",
    "source.googlecompute.gpu",
    "source.azure-arm.gpu",
  ]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}"]
  }

  provisioner "file" {
    sources     = local.uploads
    destination = "${local.staging}/"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo sh -c '{{ .Vars }} {{ .Path }}'"
    inline = [
      "sh ${local.staging}/install-spotguard.sh ${local.install_args}",
      "rm -rf ${local.staging}",
    ]
  }

  # Azure images must be generalised last; the other clouds do not need it.
  provisioner "shell" {
    only            = ["azure-arm.gpu"]
    execute_command = "chmod +x {{ .Path }}; sudo sh -c '{{ .Vars }} {{ .Path }}'"
    inline          = ["/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync"]
  }
}
